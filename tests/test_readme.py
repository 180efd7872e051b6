"""The README's loop example runs as written, in an ordinary training loop; the docs and
`configs/` name each other."""

import re
from pathlib import Path

import torch

from jestkit.models import DualEncoder, DualEncoderConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_loop_example_runs():
    code = re.search(r"```python\n(import torch\nfrom jestkit import JointSelector.*?)```",
                     README.read_text(), re.S).group(1)
    assert len(code.strip().splitlines()) <= 15
    cfg = DualEncoderConfig(vocab_size=50, image_width=16, image_depth=1, text_width=16,
                            text_depth=1, embed_dim=16, patch_size=8)
    model, reference = DualEncoder(cfg, seed=0), DualEncoder(cfg, seed=1).eval()
    g = torch.Generator().manual_seed(0)
    loader = [(torch.rand(160, 1, 32, 32, generator=g),
               torch.randint(1, 50, (160, 6), generator=g)) for _ in range(2)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    scope = {"torch": torch, "model": model, "reference": reference, "loader": loader,
             "opt": opt}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["idx"].shape == (32,)  # b = 20% of N = 160
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


DOCS = [README, *sorted((README.parent / "docs").glob("*.md")),
        README.parent / "benchmarks" / "README.md"]
CONFIGS = README.parent / "configs"


def test_docs_and_shipped_configs_name_each_other():
    # A command in the docs that names a config not shipped fails for whoever copies it; a
    # shipped config no doc names is a result nobody can find. Both directions, by file name:
    # `configs/NAME.json` in commands, and `demo-NAME` or `demo-NAME.json` in table cells.
    named = set()
    for doc in DOCS:
        text = doc.read_text()
        named |= set(re.findall(r"\bconfigs/([\w.-]+\.json)", text))
        named |= {f"{m}.json" for m in re.findall(r"`(demo-[\w.-]+?)(?:\.json)?`", text)}
    shipped = {path.name for path in CONFIGS.glob("*.json")}
    assert len(shipped) > 2, CONFIGS
    assert not named - shipped, "docs name configs that are not shipped"
    assert not shipped - named - {"demo.json"}, "shipped configs that no doc names"
