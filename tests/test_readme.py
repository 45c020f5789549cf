"""The README's promises: its two set-up commands are the ones CI runs, and its library snippet works."""
import re

import torch
from conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_setup_commands_are_two_and_ci_runs_the_test_one():
    block = re.search(r"## Set up and run.*?```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(block) == 2 and block[0].endswith("python evaluate.py --bench hotpotqa")
    assert block[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_library_snippet_runs_on_a_tiny_backbone(tiny_backbone_dir, capsys):
    code = re.search(r"<!-- library-snippet -->\n```python\n(.*?)```", README, re.S).group(1)
    assert len(code.strip().splitlines()) <= 16
    code = code.replace('MODEL = "Qwen/Qwen3-8B"', f'MODEL = r"{tiny_backbone_dir}"')
    code = code.replace("torch.bfloat16", "torch.float32")  # bf16 matmuls are slow on this CPU
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()  # an answer was decoded
