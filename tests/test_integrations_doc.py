"""docs/integrations.md runs as written: its examples, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "integrations.md"


def test_every_example_of_the_integrations_page_runs(capsys, tmp_path, monkeypatch):
    text = DOC.read_text().replace("/tmp/gradmetanet-doc-lora", str(tmp_path / "lora"))
    blocks = re.findall(r"<!-- example: ([\w-]+) -->\s*```python\n(.*?)```", text, re.S)
    assert [name for name, _ in blocks] == ["gpt2-capture", "hf-labels", "llama-gradmetanet", "peft-lora"]
    scope: dict = {}
    for name, code in blocks:
        exec(compile(code, f"docs/integrations.md:{name}", "exec"), scope)
    printed = capsys.readouterr().out
    assert "torch.Size([8, 64, 32]) torch.Size([8, 32, 96])" in printed
    assert "('perm', 32)" in printed and "('perm', 128)" in printed
    assert "torch.Size([1, 48, 32, 1])" in printed and "loss after 5 steps" in printed
    assert "[2, 4] torch.Size([4, 32, 96])" in printed and "torch.Size([4, 2])" in printed
