"""The judge with both backends: a tiny local model, and an OpenAI-compatible HTTP server on
loopback that answers from the same tiny model (real model, real sockets, real JSON)."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from backend.compute import judge as judge_mod
from backend.compute.judge import EndpointJudge, JudgeError, LocalJudge, judge_rows, rescore

# Its module-scoped fixture is built once: the file's tests run in one process (`-n auto`
# with `--dist loadgroup`, pyproject.toml).
pytestmark = pytest.mark.xdist_group("judge")

WORDS = "yes no lamp red glows green"  # with the specials and ? : . under 20 tokens: all in top_logprobs


@pytest.fixture(scope="module")
def judge_model(tmp_path_factory) -> Path:
    """A 2-layer Llama with random weights and a word-level vocabulary holding yes and no."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-judge")
    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator([WORDS, "? : ."], trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(3)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def test_a_judge_saved_as_pickles_is_refused_in_one_line(judge_model: Path, tmp_path: Path):
    """The judge loads as the bases do: safetensors only (a pickle can run code as it loads)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "pickled-judge"
    shutil.copytree(judge_model, folder)
    state = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    torch.save(state, folder / "pytorch_model.bin")  # as older checkpoints hold their weights
    with pytest.raises(JudgeError) as err:
        LocalJudge(str(folder), device="cpu")
    line = str(err.value)
    assert "\n" not in line and "pickles (.bin)" in line and "save_pretrained" in line


ITEMS = [
    ("names the colour", "The lamp is", "red"),
    ("names the colour", "The lamp is", "glows"),
    ("one word", "Reply", "the lamp is green and glows"),
    ("names the colour", "The lamp is", ""),
]


def test_local_judge_is_deterministic_and_batching_changes_nothing(judge_model: Path):
    batched = LocalJudge(str(judge_model), device="cpu", batch_size=8).grade(ITEMS)
    single = LocalJudge(str(judge_model), device="cpu", batch_size=1).grade(ITEMS)
    assert [v.p_yes for v in batched] == pytest.approx([v.p_yes for v in single], abs=1e-6)
    for v in batched:
        assert 0.0 < v.p_yes < 1.0 and v.verdict == (v.p_yes >= 0.5) and v.error is None
        assert "Rubric:" in v.prompt and v.raw.startswith("loglik yes")
    # P(yes) is the softmax of the two log-likelihoods written in raw
    ll_yes, ll_no = (float(x.split()[-1]) for x in batched[0].raw.removeprefix("loglik ").split(", "))
    assert batched[0].p_yes == pytest.approx(1 / (1 + math.exp(ll_no - ll_yes)), abs=1e-5)
    # the answer is part of what is judged: different answers, different P(yes)
    assert len({round(v.p_yes, 6) for v in batched}) > 1


class _Server:
    """/v1/chat/completions answered by the tiny model: the next token after the prompt, with the
    top log-probabilities of that first token when `logprobs` is asked for."""

    def __init__(self, folder: Path, *, with_logprobs: bool = True) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
        self.with_logprobs = with_logprobs
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                if self.path != "/v1/chat/completions" or body.get("model") != "tiny-judge":
                    self.send_response(404)
                    self.end_headers()
                    self.wfile.write(b'{"error": "no such model"}')
                    return
                reply = server.answer(body)
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def answer(self, body: dict) -> dict:
        import torch

        prompt = body["messages"][-1]["content"]
        ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        top = torch.topk(logprobs, min(int(body.get("top_logprobs") or 1), logprobs.numel()))
        first = self.tok.decode([int(top.indices[0])])
        choice = {"index": 0, "message": {"role": "assistant", "content": first}, "finish_reason": "length"}
        if self.with_logprobs and body.get("logprobs"):
            entries = [{"token": self.tok.decode([int(i)]), "logprob": float(v)} for v, i in zip(top.values, top.indices)]
            choice["logprobs"] = {"content": [{"token": first, "logprob": entries[0]["logprob"], "top_logprobs": entries}]}
        return {"id": "x", "object": "chat.completion", "model": body["model"], "choices": [choice]}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_endpoint_judge_agrees_with_the_local_judge_on_the_same_model(judge_model: Path, monkeypatch):
    local = LocalJudge(str(judge_model), device="cpu").grade(ITEMS)
    monkeypatch.setenv("TINY_JUDGE_KEY", "secret-123")
    with _Server(judge_model) as server:
        remote = EndpointJudge(server.url, "tiny-judge", key_env="TINY_JUDGE_KEY").grade(ITEMS)
    assert [v.p_yes for v in remote] == pytest.approx([v.p_yes for v in local], abs=1e-4)
    assert [v.verdict for v in remote] == [v.verdict for v in local]
    assert all(r["auth"] == "Bearer secret-123" and r["temperature"] == 0 for r in server.requests)
    assert [r["messages"][0]["content"] for r in server.requests] == [v.prompt for v in local]


def test_endpoint_without_logprobs_parses_words_and_records_failures(judge_model: Path):
    with _Server(judge_model, with_logprobs=False) as server:
        verdicts = EndpointJudge(server.url, "tiny-judge").grade(ITEMS)
        # the reply is the model's next word: a verdict only when it is yes or no, else a failure
        for v in verdicts:
            if v.raw.strip().lower() in ("yes", "no"):
                assert v.verdict == (v.raw.strip().lower() == "yes") and v.error is None
            else:
                assert v.verdict is None and v.p_yes is None and "neither yes nor no" in v.error
        wrong = EndpointJudge(server.url, "other-model").grade(ITEMS[:1])[0]
        assert wrong.verdict is None and wrong.error == "HTTP 404"
    url = server.url
    with pytest.raises(JudgeError, match="cannot reach the judge"):
        EndpointJudge(url, "tiny-judge").grade(ITEMS[:1])  # the server is gone


def test_word_verdicts_in_english_and_russian():
    assert judge_mod._word_verdict("Yes.") is True and judge_mod._word_verdict(" no, because") is False
    assert judge_mod._word_verdict("Да") is True and judge_mod._word_verdict("нет!") is False
    assert judge_mod._word_verdict("maybe") is None and judge_mod._word_verdict("") is None


class _FixedJudge:
    """A judge whose answers are given: to test how verdicts re-score a run (no model needed)."""

    name = "fixed"

    def __init__(self, answers):
        self.answers = list(answers)

    def grade(self, items):
        return [judge_mod.Verdict(judge_mod.judge_prompt(*it), str(a), a, None if a is None else float(a), None, self.name)
                for it, a in zip(items, self.answers)]


def test_verdicts_are_stored_per_scene_and_rescore_the_run():
    def gen(scene_id, metric, checks, words, rubric=True):
        detail = {"prompt": "P", "text": "w " * words, "words": words,
                  "checks": [{"check": k, "passed": ok} for k, ok in checks]}
        if rubric:
            detail["rubric"] = "says it"
        return {"battery": metric, "scene_id": scene_id, "kind": "generate", "metric": metric,
                "score": 1.0, "correct": True, "detail": detail}

    rows = [
        gen("c1", "compression", [("contains", True), ("max_words", True)], 4),
        gen("x1", "style", [("contains", True)], 3),
        gen("x2", "style", [("contains", True)], 3),
        gen("x3", "style", [("contains", True)], 3, rubric=False),
    ]
    judged, counts = judge_rows(rows, _FixedJudge([True, False, None]))
    assert counts == {"graded": 3, "yes": 1, "no": 1, "parse_failures": 1}
    by_id = {r["scene_id"]: r for r in judged}
    assert by_id["c1"]["score"] == pytest.approx(2 / 4)  # 2 ideas (check + judge) in 4 words
    assert by_id["x1"]["score"] == 0.5 and by_id["x1"]["correct"] is False  # judge said no
    assert by_id["x2"]["score"] == 1.0 and by_id["x2"]["detail"]["judge"]["error"] is None
    assert by_id["x2"]["detail"]["judge"]["verdict"] is None  # unparsed: stored, not counted
    assert "judge" not in by_id["x3"]["detail"]
    scores, overall = rescore(judged)
    assert scores["style"]["value"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert overall == pytest.approx((0.5 + (0.5 + 1 + 1) / 3) / 2)
