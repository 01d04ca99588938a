"""Language-model jobs end to end: the smoke job (jobs/lm-smoke.yaml, a tiny random GPT-2 in
checkpoints/ and a local text file) on a real local Ray instance, text data selection and its
cache, and bad input with one line each. Nothing is downloaded."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import ROOT
from ribray.cli import app
from ribray.config import TextData, load_job
from ribray.orchestrate import run_job
from ribray.store import open_store
from ribray.text import TextDataError, text_dataset

runner = CliRunner()
SMOKE = ROOT / "jobs" / "lm-smoke.yaml"
MODEL = ROOT / "checkpoints" / "lm-smoke"
TEXT = ROOT / "data" / "lm-smoke.txt"


def _job(tmp_path, **data) -> object:
    spec = yaml.safe_load(SMOKE.read_text())
    spec["model"]["path"] = str(MODEL)
    spec["data"].update({"path": str(TEXT), "cache_dir": str(tmp_path / "cache"), **data})
    spec["out"] = str(tmp_path / "store.zarr")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_the_smoke_job_writes_a_complete_store(ray_local, tmp_path):
    job = load_job(_job(tmp_path))
    run_job(job, tmp_path / "store.zarr", dashboard=False, log=lambda s: None)
    root = open_store(tmp_path / "store.zarr")
    assert root.attrs["status"] == "complete"
    assert root.attrs["n_samples"] == 96 and root.attrs["n_jacobian_samples"] == 24
    for name in job.basis.node_layers[:-1]:
        g = root[f"layers/{name}"]
        w, var = g.attrs["width"], g.attrs["variance_raw_index"]
        assert g.attrs["complete"] and g.attrs["const_raw_index"] == w - 1
        if name.split(".")[0] in ("ln1_out", "ln2_out"):
            # the variance is its own feature, never rotated into the others: its column of C
            # touches only the variance coordinate (and the constant, which centres it)
            assert var == w - 2 and g.attrs["variance_feature"] == 1
            C = np.asarray(g["C"][...])
            others = np.delete(np.arange(w), [var, w - 1])
            assert np.abs(C[others, 1]).max() == 0.0 and C[var, 1] != 0.0
            assert np.abs(C[var, 2:]).max() == 0.0
        else:
            assert var is None and g.attrs.get("variance_feature") is None
        # is the data enough: the M phase's two shards (24 sequences of 12) left out in turn
        st = g.attrs["stability"]
        assert st["n_shards"] == 2 and 0 <= st["max_principal_angle_deg"] <= 90
        assert all(v >= 0 for v in st["top_lambda_rel_se"])
    for a, b in zip(job.basis.node_layers[:-1], job.basis.node_layers[1:]):
        E = np.asarray(root[f"edges/{a}--{b}/E"][...])
        assert np.isfinite(E).all() and E.sum() > 0
    # feature examples: the stored top and bottom rows are the brute-force ones, with contexts
    from ribray.build import load_data, load_sequential

    model, data = load_sequential(job), load_data(job)
    for layer in job.features.layers:
        g = root[f"features/{layer}"]
        C = torch.as_tensor(np.asarray(root[f"layers/{layer}/C"][...]))
        with torch.no_grad():
            f = (model.activations(data.inputs, [layer])[layer] @ C).numpy()  # (N, T, k)
        flat = f.reshape(-1, f.shape[-1]).T
        want_top = -np.sort(-flat, axis=1)[:, :5]
        np.testing.assert_allclose(np.asarray(g["top_value"][...]), want_top, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(g["bottom_value"][...]),
                                   np.sort(flat, axis=1)[:, :5], rtol=1e-12)
        smp, pos = np.asarray(g["top_sample"][...]), np.asarray(g["top_position"][...])
        np.testing.assert_allclose(f[smp, pos, np.arange(f.shape[-1])[:, None]], want_top,
                                   rtol=1e-12)
        ctx = np.asarray(g["top_context"][...])
        s0, p0 = int(smp[0, 0]), int(pos[0, 0])
        tail = data.inputs[s0, max(0, p0 - 5): p0 + 1].tolist()
        assert ctx[0, 0, 6 - len(tail):].tolist() == tail
        edges, vals = np.asarray(g["interval_edges"][...]), np.asarray(g["interval_value"][...])
        for i in range(vals.shape[1]):
            v = vals[:, i]
            ok = np.isnan(v) | ((v >= edges[:, i, None] - 1e-12) &
                                (v <= edges[:, i + 1, None] + 1e-12))
            assert ok.all()
        assert np.isfinite(vals).any()
    shown = runner.invoke(app, ["show", str(tmp_path / "store.zarr")])
    assert shown.exit_code == 0 and "Is the data enough?" in shown.output
    assert "Λ ln var" in shown.output
    analysed = runner.invoke(app, ["analyze", str(tmp_path / "store.zarr"), "--no-dashboard"])
    _one_line(analysed, "field data", "not supported yet")


def test_text_selection_packing_and_cache(tmp_path):
    """Sequences are the joined token stream cut every n_ctx tokens; each label is the next
    token of the stream; a second read comes from the cache; pre-tokenised input works."""
    from transformers import AutoTokenizer

    spec = TextData(path=str(TEXT), n_ctx=8, documents=5, cache_dir=str(tmp_path / "c"))
    ds = text_dataset(spec, str(MODEL))
    tok = AutoTokenizer.from_pretrained(str(MODEL))
    stream = []
    for line in TEXT.read_text().splitlines()[:5]:
        stream += tok(line)["input_ids"] + [tok.eos_token_id]
    n = len(stream) // 8
    assert ds.inputs.shape == (n, 8)
    assert ds.inputs.flatten().tolist() == stream[: n * 8]
    assert ds.labels.tolist() == [stream[(i + 1) * 8] if (i + 1) * 8 < len(stream)
                                  else tok.eos_token_id for i in range(n)]
    cached = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert len(cached) == 2 and all(p.endswith(".npy") for p in cached)
    again = text_dataset(spec, str(MODEL))
    assert torch.equal(again.inputs, ds.inputs)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == cached
    rows = [{"ids": tok(line)["input_ids"]} for line in TEXT.read_text().splitlines()[:5]]
    (tmp_path / "tok.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pre = text_dataset(TextData(path=str(tmp_path / "tok.jsonl"), tokens_column="ids", n_ctx=8,
                                cache_dir=str(tmp_path / "c2")), None)
    joined = [t for r in rows for t in r["ids"]]  # no tokenizer: no end-of-text token
    assert pre.inputs.flatten().tolist() == joined[: len(joined) // 8 * 8]
    with pytest.raises(TextDataError, match="asked for"):
        text_dataset(spec.model_copy(update={"n_samples": 10_000}), str(MODEL))
    # with n_samples, reading stops once those sequences (and the next token) are there
    first = text_dataset(spec.model_copy(update={"n_samples": 3}), str(MODEL))
    assert torch.equal(first.inputs, ds.inputs[:3]) and torch.equal(first.labels, ds.labels[:3])


def _one_line(res, *needles) -> None:
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_bad_language_model_input_is_one_line(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    # a context longer than the model's (64 positions)
    _one_line(runner.invoke(app, ["validate", str(_job(tmp_path, n_ctx=128, n_samples=2))]),
              "field data", "exceed the model's n_ctx 64")
    # too few tokens for the sequences asked for
    _one_line(runner.invoke(app, ["validate", str(_job(tmp_path, n_samples=100_000))]),
              "data.path", "asked for (data.n_samples)")
    # a tokenizer with more tokens than the model's vocabulary
    small = tmp_path / "small-gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=64, n_embd=16, n_layer=2, n_head=2,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(small)
    job = _job(tmp_path, tokenizer=str(MODEL))
    spec = yaml.safe_load(job.read_text())
    spec["model"]["path"] = str(small)
    job.write_text(yaml.safe_dump(spec))
    _one_line(runner.invoke(app, ["validate", str(job)]), "data.path", "has 53 tokens",
              "vocabulary 20")
    # an architecture that is not a GPT-2, GPT-Neo or GPT-NeoX
    BertForMaskedLM(BertConfig(vocab_size=30, hidden_size=12, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=20)
                    ).save_pretrained(tmp_path / "bert")
    spec["model"]["path"] = str(tmp_path / "bert")
    job.write_text(yaml.safe_dump(spec))
    _one_line(runner.invoke(app, ["validate", str(job)]), "model.path",
              "architecture 'bert' is not supported")
    # a node layer the model does not have
    spec["model"]["path"] = str(MODEL)
    spec.pop("features")
    spec["basis"]["node_layers"] = ["ln1.0", "ln1_out.7", "output"]
    job.write_text(yaml.safe_dump(spec))
    _one_line(runner.invoke(app, ["validate", str(job)]), "basis.node_layers", "ln1_out.7")
    # a section one sample of which does not fit the memory budget
    spec["basis"]["node_layers"] = ["ln1.0", "ln1_out.0", "attn_in.0", "ln2.0", "output"]
    spec["ray"]["memory_budget_gb"] = 1e-6
    job.write_text(yaml.safe_dump(spec))
    _one_line(runner.invoke(app, ["validate", str(job)]), "field ray.memory_budget_gb",
              "attn_in.0 -> ln2.0", "more than the")
    # and nothing was written
    assert not (tmp_path / "store.zarr").exists()


def test_the_paper_jobs_validate_offline():
    """gpt2.yaml and tinystories.yaml name hub models and data: validate checks their fields
    (and node layers' names against nothing: they are checked when the job runs) without a
    download, and says so."""
    for name, n_layers in (("gpt2", 74), ("tinystories", 50)):
        res = runner.invoke(app, ["validate", str(ROOT / "jobs" / f"{name}.yaml")])
        assert res.exit_code == 0, res.output
        text = " ".join(res.output.split())
        assert f"ok (lib, {n_layers} node layers)" in text and "checked when the job runs" in text
        job = load_job(ROOT / "jobs" / f"{name}.yaml")
        assert job.model.format == "hf" and not job.model.trust_remote_code
        assert job.data.jacobian_samples == 500


def _sources_job(tmp_path, name: str, shard_size: int, workers: int):
    """lm-smoke with stochastic sources (R = 2) over fewer node layers: closed forms
    (ln1_out.0 to attn_in.0, a layer norm's "out" half; unembed to output), an attention
    section (attn_in.0), a section across a whole block (ln2.0 to ln_final) and one of two
    layer-norm halves (ln_final to unembed: position-wise, but on the exact path)."""
    spec = yaml.safe_load(SMOKE.read_text())
    spec.pop("features")
    spec["model"]["path"] = str(MODEL)
    spec["data"].update({"path": str(TEXT), "cache_dir": str(tmp_path / "cache"),
                         "n_samples": 48})
    spec["basis"]["node_layers"] = ["ln1_out.0", "attn_in.0", "ln2.0", "ln_final", "unembed",
                                    "output"]
    spec["sources"] = {"r": 2, "seed": 5}
    spec["ray"].update({"shard_size": shard_size, "num_workers": workers})
    spec["out"] = str(tmp_path / f"{name}.zarr")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_stochastic_sources_store_and_show_their_error(ray_local, tmp_path):
    """With R = 2 sources the sections that take them store the sources' error (layer attr
    ``stochastic_error``, edge attr ``edges_rel_error``), the closed forms none; a
    position-wise section's M is exact with sources (φ² = 1: no spread), its edges are not
    (the square of a sum over positions); the numbers do not depend on the shards or workers
    (each sample's sources are its own); ``show`` prints them and ``--json`` has them."""
    errs = {}
    for name, shard, workers in (("split", 12, 2), ("whole", 24, 1)):
        job = load_job(_sources_job(tmp_path, name, shard, workers))
        run_job(job, tmp_path / f"{name}.zarr", dashboard=False, log=lambda s: None)
        root = open_store(tmp_path / f"{name}.zarr")
        assert root.attrs["status"] == "complete"
        errs[name] = {n: root[f"layers/{n}"].attrs.get("stochastic_error")
                      for n in job.basis.node_layers[:-1]}
        errs[name]["edges"] = root["edges/attn_in.0--ln2.0"].attrs["edges_rel_error"]
        assert root["edges/ln_final--unembed"].attrs["edges_rel_error"] > 0
        for a, b in (("ln1_out.0", "attn_in.0"), ("unembed", "output")):
            assert "edges_rel_error" not in root[f"edges/{a}--{b}"].attrs
    split, whole = errs["split"], errs["whole"]
    for n in ("ln1_out.0", "unembed"):
        assert split[n] is None and whole[n] is None, n
    assert split["ln_final"]["m_rel_error"] == 0.0
    assert max(split["ln_final"]["top_lambda_rel_se"]) == 0.0
    for n in ("attn_in.0", "ln2.0"):
        a, b = split[n], whole[n]
        assert a["r"] == b["r"] == 2 and 0 < a["m_rel_error"] < 1
        assert a["m_rel_error"] == pytest.approx(b["m_rel_error"], rel=1e-8)
        np.testing.assert_allclose(a["top_lambda_rel_se"], b["top_lambda_rel_se"], rtol=1e-6)
    assert 0 < split["edges"] == pytest.approx(whole["edges"], rel=1e-8)
    store = str(tmp_path / "split.zarr")
    shown = runner.invoke(app, ["show", store])
    assert shown.exit_code == 0, shown.output
    text = shown.output
    assert "Stochastic sources" in text
    assert f"{100 * split['ln2.0']['m_rel_error']:.2g}%" in text
    assert "rel. error (sources)" in text
    s = json.loads(runner.invoke(app, ["show", store, "--json"]).output)
    by_layer = {row["layer"]: row for row in s["layers"]}
    assert by_layer["attn_in.0"]["stochastic_error"] == split["attn_in.0"]
    assert by_layer["ln1_out.0"]["stochastic_error"] is None
    by_edge = {e["edge"]: e for e in s["edges"]}
    assert by_edge["attn_in.0--ln2.0"]["edges_rel_error"] == split["edges"]
    assert by_edge["attn_in.0--ln2.0"]["sources_r"] == 2
    from ribray.report import write_report

    page = write_report(store, tmp_path / "report", log=lambda s: None).read_text("utf-8")
    tables = page.split("Is the data enough?")[1]
    row = re.search(r"<tr><td>attn_in\.0</td><td[^>]*>2</td><td[^>]*>([^<]*)</td>",
                    tables.split("stochastic sources")[0].split("sources r")[1])
    assert row and row.group(1) == f"{split['attn_in.0']['m_rel_error']:.4g}"
