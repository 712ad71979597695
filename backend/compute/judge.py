"""The judge: a second model grades generated answers on the rubric written in the scene.

    ltm-tui judge RUN... --model PATH                         # a local Hugging Face model
    ltm-tui judge RUN... --endpoint URL --judge-model NAME     # any OpenAI-compatible server
                         [--key-env VAR]                       # (vLLM, llama.cpp, ollama, ...)

A generate scene with a `judge:` rubric keeps its prompt, its completion and the rubric in its
result; the judge reads them after the run, so any judge can grade (and re-grade) any run. Each
grade is stored in the scene's detail as `judge`: the exact prompt the judge saw, its raw reply,
the verdict (yes/no, or None when the reply could not be parsed) and P(yes). The run is then
re-scored (backend.scoring.measures.rescore_generate, score_run): the verdict counts as one more check,
and for compression as one more key idea. docs/measures.md describes it.

- Local: deterministic. P(yes) = softmax over the log-likelihoods of " yes" and " no" after the
  prompt, scored in batches by the testbench's own `loglikelihoods` (no sampling).
- Endpoint: POST {base}/chat/completions with temperature 0 and `logprobs`; P(yes) from the
  first token's top log-probabilities when the server gives them, else the reply's first word.
  The key is read from the environment variable named by --key-env, never from the command line.
"""

from __future__ import annotations

import json
import math
import os
import re
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Sequence

from backend.core.errors import LtmError
from backend.scoring import measures

JUDGE_TEMPLATE = (
    "You grade an answer against a rubric. Reply with one word: yes or no.\n"
    "Rubric: {rubric}\n"
    "Prompt: {prompt}\n"
    "Answer: {answer}\n"
    "Does the answer meet the rubric? Reply yes or no:"
)
YES_WORDS = ("yes", "да")
NO_WORDS = ("no", "нет")


class JudgeError(LtmError):
    title = "judge"


@dataclass
class Verdict:
    prompt: str  # exactly what the judge was shown
    raw: str  # its reply (endpoint) or the two log-likelihoods (local)
    verdict: bool | None  # None: the reply could not be parsed
    p_yes: float | None
    error: str | None = None
    judge: str = ""  # which judge gave it

    def to_dict(self) -> dict:
        return asdict(self)


def judge_prompt(rubric: str, prompt: str, answer: str) -> str:
    return JUDGE_TEMPLATE.format(rubric=rubric.strip(), prompt=prompt.strip(), answer=answer.strip() or "(empty)")


def _word_verdict(text: str) -> bool | None:
    """yes/no (or да/нет) as the reply's first word, ignoring case and punctuation."""
    match = re.match(r"\W*(\w+)", text.strip().casefold())
    if not match:
        return None
    word = match.group(1)
    if word in YES_WORDS:
        return True
    if word in NO_WORDS:
        return False
    return None


class LocalJudge:
    """A local Hugging Face causal LM: P(yes) against P(no) by log-likelihood, batched."""

    def __init__(self, path: str, *, device: str | None = None, batch_size: int = 16) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from backend.compute.models import HFTokenizer, pickled_weights, train_dtype

        self.name = f"local:{path}"
        self.batch_size = batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        where = {"": self.device.index or 0} if self.device.type == "cuda" else {"": str(self.device)}
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            # as the bases load: safetensors only, read straight onto the device, in bf16 on a
            # card that has it (a 13B judge in fp32 would be 52 GB); fp32 elsewhere, as fp16 can
            # overflow in a model trained in bf16
            dtype = train_dtype(self.device)
            self.model = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, use_safetensors=True, device_map=where,
                dtype=torch.float32 if dtype == torch.float16 else dtype)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise JudgeError(pickled_weights(path, first)
                             or f"cannot load the judge model {path}: {first[:160]} (give a local model folder)") from None
        self.model.eval()
        self.tok = HFTokenizer(tok)

    def grade(self, items: Sequence[tuple[str, str, str]]) -> list[Verdict]:
        from backend.compute.evaluate import LoglikRequest, loglikelihoods

        prompts = [judge_prompt(*item) for item in items]
        requests = [LoglikRequest(p, c) for p in prompts for c in (" yes", " no")]
        scored = loglikelihoods(self.model, self.tok, requests, device=self.device, batch_size=self.batch_size)
        out = []
        for i, prompt in enumerate(prompts):
            ll_yes, ll_no = scored[2 * i][0], scored[2 * i + 1][0]
            p_yes = 1.0 / (1.0 + math.exp(ll_no - ll_yes))
            raw = f"loglik yes {ll_yes:.6f}, no {ll_no:.6f}"
            out.append(Verdict(prompt, raw, p_yes >= 0.5, p_yes, None, self.name))
        return out


class EndpointJudge:
    """Any OpenAI-compatible chat endpoint; the API key comes from an environment variable."""

    def __init__(self, base_url: str, model: str, *, key_env: str | None = None, timeout: float = 120.0) -> None:
        if not re.match(r"https?://", base_url):
            raise JudgeError(f"{base_url!r} is not an http(s) URL; give the server's base such as http://localhost:8000/v1")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout = timeout
        self.name = f"endpoint:{model}@{base_url}"
        self.key = None
        if key_env:
            self.key = os.environ.get(key_env)
            if not self.key:
                raise JudgeError(f"the environment variable {key_env} is empty; export the API key there")

    def _ask(self, prompt: str) -> dict:
        body = json.dumps({
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": 4,
            "logprobs": True,
            "top_logprobs": 20,
        }).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read().decode("utf-8"))

    def grade(self, items: Sequence[tuple[str, str, str]]) -> list[Verdict]:
        out = []
        for item in items:
            prompt = judge_prompt(*item)
            try:
                reply = self._ask(prompt)
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode("utf-8", "replace")[:200]
                out.append(Verdict(prompt, detail, None, None, f"HTTP {exc.code}", self.name))
                continue
            except urllib.error.URLError as exc:
                raise JudgeError(f"cannot reach the judge at {self.url}: {exc.reason}") from None
            except (OSError, ValueError) as exc:
                out.append(Verdict(prompt, "", None, None, f"bad reply: {exc}"[:200], self.name))
                continue
            out.append(self._verdict(prompt, reply))
        return out

    def _verdict(self, prompt: str, reply: Mapping) -> Verdict:
        try:
            choice = reply["choices"][0]
            content = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            return Verdict(prompt, json.dumps(reply)[:500], None, None, "reply has no choices[0].message", self.name)
        p_yes = _p_yes_from_logprobs(choice.get("logprobs"))
        if p_yes is not None:
            return Verdict(prompt, content, p_yes >= 0.5, p_yes, None, self.name)
        verdict = _word_verdict(content)
        if verdict is None:
            return Verdict(prompt, content, None, None, "the reply is neither yes nor no", self.name)
        return Verdict(prompt, content, verdict, float(verdict), None, self.name)


def _p_yes_from_logprobs(logprobs) -> float | None:
    """P(yes) / (P(yes) + P(no)) over the first token's top log-probabilities, when both a yes and
    a no token are among them (tokens compared without spaces and case)."""
    try:
        top = logprobs["content"][0]["top_logprobs"]
    except (KeyError, IndexError, TypeError):
        return None
    best: dict[bool, float] = {}
    for entry in top or ():
        verdict = _word_verdict(str(entry.get("token", "")))
        if verdict is not None and str(entry.get("token", "")).strip().casefold() in YES_WORDS + NO_WORDS:
            best[verdict] = max(best.get(verdict, -math.inf), float(entry["logprob"]))
    if True not in best or False not in best:
        return None
    return 1.0 / (1.0 + math.exp(best[False] - best[True]))


def make_judge(*, model: str | None = None, endpoint: str | None = None, judge_model: str | None = None,
               key_env: str | None = None, device: str | None = None, batch_size: int = 16):
    if bool(model) == bool(endpoint):
        raise JudgeError("give either --model PATH (a local judge) or --endpoint URL --judge-model NAME")
    if endpoint:
        if not judge_model:
            raise JudgeError("--endpoint needs --judge-model NAME (the model the server serves)")
        return EndpointJudge(endpoint, judge_model, key_env=key_env)
    return LocalJudge(model, device=device, batch_size=batch_size)


def judge_rows(scene_results: Iterable[Mapping], judge) -> tuple[list[dict], dict]:
    """Grade every generate scene that carries a rubric; return (re-scored rows, counts)."""
    rows = [dict(r, detail=dict(r.get("detail") or {})) for r in scene_results]
    todo = [r for r in rows if r.get("kind") == "generate" and r["detail"].get("rubric")]
    verdicts = judge.grade([(r["detail"]["rubric"], r["detail"].get("prompt", ""), r["detail"].get("text", "")) for r in todo])
    for r, v in zip(todo, verdicts):
        r["detail"]["judge"] = v.to_dict()
        r["score"], r["correct"] = measures.rescore_generate(r.get("metric") or "", r["detail"])
    counts = {
        "graded": len(todo),
        "yes": sum(v.verdict is True for v in verdicts),
        "no": sum(v.verdict is False for v in verdicts),
        "parse_failures": sum(v.verdict is None for v in verdicts),
    }
    return rows, counts


def rescore(rows: list[dict]) -> tuple[dict, float | None]:
    """Scores (with intervals) and overall of a run from its scene results."""
    scores = measures.score_run(rows)
    return scores, measures.overall({k: v["value"] for k, v in scores.items()})
