"""What every part shares and nothing else: errors, job states, training config, the workspace, events."""
