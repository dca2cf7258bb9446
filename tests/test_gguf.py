"""GGUF import: a llama.cpp file gives the model transformers' own GGUF loader gives.

Every file here is written by the test with ``gguf.GGUFWriter`` from a random
``transformers`` model, the way llama.cpp's ``convert_hf_to_gguf.py`` writes it (q/k rows
permuted to llama.cpp's interleaved RoPE layout, linears quantized), so no download is
needed. The reference is ``transformers.AutoModelForCausalLM.from_pretrained(gguf_file=...)``
(independent code: its own name map and permutation reversal).
"""

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF import needs: pip install -e '.[real]'")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import quants  # noqa: E402

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _tokenizer_metadata():
    """A small byte-level BPE trained here: (tokens in id order, token types, merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    text = ["def main(argv):\n    return argv[0] + 1\n", "Hello, world! The cat sat."] * 50
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(text, trainer)
    spec = json.loads(tk.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = [3 if t in SPECIALS else 1 for t in tokens]  # 3: control
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, types, merges


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permutation of q/k rows (the reference we undo)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(path, arch="llama", types=None, tied=True, seed=0):
    """A tiny model as llama.cpp writes it; ``types``: {gguf tensor suffix: quant type}.
    Returns the transformers model the file was made from (for shapes; the reference is
    transformers loading the file itself)."""
    tokens, ttypes, merges = _tokenizer_metadata()
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=len(tokens),
        hidden_size=64,
        intermediate_size=256,  # a multiple of 256: K-quant rows for ffn_down
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
    )
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**kw)
        hf = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**kw)
        hf = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    sd = {k: v.float().numpy() for k, v in hf.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(256)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(ttypes)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    types = types or {}

    def put(name, array, default=Q.F32):
        qtype = types.get(name.split(".", 2)[-1] if name.startswith("blk.") else name, default)
        array = np.ascontiguousarray(array, dtype=np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, array)
        elif qtype == Q.F16:
            w.add_tensor(name, array.astype(np.float16))
        elif qtype in (Q.Q4_K, Q.Q6_K, Q.Q2_K):  # gguf cannot quantize these: valid raw blocks
            w.add_tensor(name, _raw_kquant(array.shape, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, quants.quantize(array, qtype), raw_dtype=qtype)

    put("token_embd.weight", sd["model.embed_tokens.weight"], Q.Q8_0)
    put("output_norm.weight", sd["model.norm.weight"])
    if not tied:
        put("output.weight", sd["lm_head.weight"], Q.Q8_0)
    permute = arch == "llama"
    for i in range(2):
        p = f"model.layers.{i}."
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        if permute:
            q, k = _llama_cpp_permute(q, 4), _llama_cpp_permute(k, 2)
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", q, Q.Q4_0)
        put(f"blk.{i}.attn_k.weight", k, Q.Q4_1)
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"], Q.F16)
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"], Q.BF16)
        put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"], Q.Q8_0)
        put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"], Q.Q5_0)
        put(
            f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"], Q.Q4_K if i == 0 else Q.Q6_K
        )
        if arch == "qwen2":
            for n in "qkv":
                put(f"blk.{i}.attn_{n}.bias", sd[p + f"self_attn.{n}_proj.bias"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def _raw_kquant(shape, qtype) -> np.ndarray:
    """Random K-quant blocks with finite scales (gguf's Python code dequantizes K-quants but
    cannot quantize to them)."""
    rows, cols = shape
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    if qtype == Q.Q6_K:  # ... ql, qh, scales, then d (fp16) at the end of each block
        raw[..., -2:] = scale
    else:  # Q4_K / Q2_K: d and dmin (fp16) lead (Q4_K) or end (Q2_K) each block
        at = slice(0, 4) if qtype == Q.Q4_K else slice(size - 4, size)
        raw[..., at] = np.tile(scale, 2)
    return raw.reshape(rows, -1)


def _reference(path):
    """transformers' own GGUF loading of ``path`` (model and tokenizer)."""
    transformers.utils.logging.set_verbosity_error()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, torch_dtype=torch.float32
    )
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return hf.eval(), tok


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("qwen2", True)])
def test_gguf_model_equals_transformers_gguf_loading(tmp_path, arch, tied):
    import earlyexit

    path = tmp_path / "m.gguf"
    write_gguf(path, arch=arch, tied=tied)
    ref, ref_tok = _reference(path)
    lm = earlyexit.load(path, device="cpu")
    text = "def main(argv):\n    return 1"
    ids = lm.encode(text)
    assert ids == ref_tok.encode(text)  # the same tokenizer
    x = torch.tensor([ids])
    with torch.inference_mode():
        ours, theirs = lm.model(x), ref(x).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    with torch.inference_mode():
        want = ref.generate(x, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    got = lm.generate(ids, max_new_tokens=12, ignore_eos=True)
    assert got.token_ids == want[0, len(ids) :].tolist()
    # the chat template renders exactly as transformers renders it
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert lm.encode_chat(msgs) == ref_tok.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True, return_dict=False
    )


def test_gguf_import_writes_a_checkpoint_with_tokenizer_and_chat_template(tmp_path):
    import earlyexit
    from earlyexit.cli import main

    path = tmp_path / "m.gguf"
    write_gguf(path)
    assert main(["convert", "gguf-import", str(path), str(tmp_path / "ours")]) == 0
    files = {p.name for p in (tmp_path / "ours").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    a, b = earlyexit.load(tmp_path / "ours"), earlyexit.load(path)
    for (k, v), (k2, v2) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert a.chat_config["chat_template"] == CHATML
    # hf-import of a .gguf file is the same conversion
    assert main(["convert", "hf-import", str(path), str(tmp_path / "again")]) == 0


def _one_line_error(tmp_path, capsys, src, want):
    from earlyexit.cli import main

    dst = tmp_path / "out"
    assert main(["convert", "gguf-import", str(src), str(dst)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("earlyexit: error: ") and want in err[0], err
    assert not dst.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_bad_gguf_files_are_one_line_errors_and_write_nothing(tmp_path, capsys):
    good = tmp_path / "m.gguf"
    write_gguf(good)
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) * 2 // 3])  # cut inside the tensor data
    _one_line_error(tmp_path, capsys, cut, "truncated")
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:100])  # cut inside the metadata
    _one_line_error(tmp_path, capsys, head, "truncated or corrupt GGUF")
    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"PK\x03\x04 not a gguf")
    _one_line_error(tmp_path, capsys, notgguf, "not a GGUF file")
    _one_line_error(tmp_path, capsys, tmp_path / "missing.gguf", "no such")
    q2 = tmp_path / "q2.gguf"
    write_gguf(q2, types={"ffn_down.weight": Q.Q2_K})
    _one_line_error(tmp_path, capsys, q2, "stored as Q2_K")
    other = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(other), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _one_line_error(tmp_path, capsys, other, "unsupported GGUF architecture 'gpt2'")


def test_named_model_resolves_and_converts_once(tmp_path, monkeypatch):
    """--model NAME: the package's file is converted once into the cache, then reused."""
    from earlyexit.io import registry

    src = tmp_path / "pkg" / "tiny.gguf"
    src.parent.mkdir()
    write_gguf(src)
    monkeypatch.setenv("EARLYEXIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(registry, "source_file", lambda name: src)
    monkeypatch.setitem(
        registry.NAMED, "tinygguf", registry.NamedModel("nopkg", "tiny.gguf", "pip install x", "t")
    )
    calls = []
    import earlyexit.io.gguf as g

    orig = g.load_gguf
    monkeypatch.setattr(g, "load_gguf", lambda *a, **k: calls.append(1) or orig(*a, **k))
    first = registry.resolve_model("tinygguf")
    assert first == tmp_path / "home" / "models" / "tinygguf" and len(calls) == 1
    assert registry.resolve_model("tinygguf") == first and len(calls) == 1  # cached
    import earlyexit

    assert earlyexit.load("tinygguf").chat_config["chat_template"] == CHATML


def test_missing_named_model_package_says_how_to_install(capsys, monkeypatch):
    from earlyexit.cli import main
    from earlyexit.io import registry

    monkeypatch.setitem(
        registry.NAMED,
        "nothere",
        registry.NamedModel("no_such_package_xyz", "f.gguf", "pip install no-such", "x"),
    )
    assert main(["generate", "--model", "nothere", "hi"]) == 1
    err = capsys.readouterr().err
    assert "needs the no_such_package_xyz package: pip install no-such" in err


def test_generate_chat_uses_the_models_template(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path)
    argv = ["generate", "--model", str(path), "--chat", "--max-new-tokens", "4", "--json"]
    p = subprocess.run(
        [sys.executable, "-m", "earlyexit", *argv, "--device", "cpu", "Hi!"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    ref_tok = _reference(path)[1]
    want = ref_tok.apply_chat_template(
        [{"role": "user", "content": "Hi!"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    assert json.loads(p.stdout)["prompt_ids"] == want


def test_conversions_and_fine_tunes_keep_the_chat_template(tmp_path):
    """A recursive conversion, a merge back and a fine-tune of an instruct model still chat."""
    import earlyexit
    from earlyexit.cli import main
    from earlyexit.training.loop import TrainConfig, _chat_files

    path = tmp_path / "m.gguf"
    write_gguf(path)
    assert main(["convert", "gguf-import", str(path), str(tmp_path / "ours")]) == 0
    assert main(["convert", "recursive", str(tmp_path / "ours"), str(tmp_path / "rec")]) == 0
    assert main(["convert", "merge", str(tmp_path / "rec"), str(tmp_path / "merged")]) == 0
    for d in ("rec", "merged"):
        assert earlyexit.load(tmp_path / d).chat_config["chat_template"] == CHATML, d
    files = _chat_files(TrainConfig(init_from=str(tmp_path / "ours")))
    assert json.loads(files["tokenizer_config.json"])["chat_template"] == CHATML
    assert _chat_files(TrainConfig()) is None  # from scratch: no template to keep


def test_server_chat_uses_the_models_own_template(tmp_path):
    """/v1/chat/completions on an instruct model: the prompt is the model's template,
    tokenized without extra special tokens, exactly as transformers renders it."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    import earlyexit
    from earlyexit.serve.app import build_app
    from earlyexit.serve.server import make_server

    path = tmp_path / "m.gguf"
    write_gguf(path)
    lm = earlyexit.load(path, device="cpu")
    server = make_server(build_app(lm, "m", max_batch=2, max_len=100), "127.0.0.1", 0)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert server.ready.wait(60)
        port = server.servers[0].sockets[0].getsockname()[1]
        msgs = [{"role": "user", "content": "Hi!"}]
        body = {"messages": msgs, "max_tokens": 3, "temperature": 0}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        want = _reference(path)[1].apply_chat_template(
            msgs, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert r.json()["usage"]["prompt_tokens"] == len(want)
        got = lm.generate(want, max_new_tokens=3)
        assert r.json()["choices"][0]["message"]["content"] == got.text
    finally:
        server.should_exit = True
        thread.join(timeout=30)
