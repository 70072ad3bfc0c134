"""
The other CPU inference engines bench/generate.py runs beside mingpt and transformers, where they are
installed (pip install -e '.[bench]'): CTranslate2 (fp32 and int8) and llama.cpp through
llama-cpp-python (f32 and q8_0 GGUF files). Each engine is made from the same transformers GPT-2
directory that mingpt loads, and each timing function returns (seconds to the first new token, total
seconds, the new tokens of the first row), as bench/generate.py's own do.

The GGUF files are written here with the gguf package (llama.cpp's own Python writer, on PyPI): GPT-2's
tensors under llama.cpp's names, its BPE vocabulary and merges, and for q8_0 the matrices in blocks of
32 int8 values with one fp16 scale each.
"""

import json
import time
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).resolve().parents[1] / 'mingpt' / 'assets' / 'gpt2'


def available():
    """ {engine family: None if importable, else the reason it is skipped} """
    reasons = {}
    for family, module in (('ctranslate2', 'ctranslate2'), ('llama.cpp', 'llama_cpp')):
        try:
            __import__(module)
            reasons[family] = None
        except ImportError as e:
            reasons[family] = f"not installed ({e.name}); pip install -e '.[bench]'"
    if reasons['llama.cpp'] is None:
        try:
            import gguf  # noqa: F401
        except ImportError:
            reasons['llama.cpp'] = "the gguf package (to write the model files) is not installed"
    return reasons


def gpt2_tokenizer(directory):
    """ write GPT-2's tokenizer files (from mingpt's own copy of the vocabulary) into an HF directory """
    from transformers import GPT2TokenizerFast
    vocab = json.loads((ASSETS / 'encoder.json').read_text(encoding='utf-8'))
    lines = (ASSETS / 'vocab.bpe').read_text(encoding='utf-8').split('\n')[1:]  # after the version line
    tok = GPT2TokenizerFast(vocab=vocab, merges=[tuple(m.split()) for m in lines if m])  # transformers 5
    if len(tok) != len(vocab):  # transformers 4 takes the two files instead
        tok = GPT2TokenizerFast(vocab_file=str(ASSETS / 'encoder.json'), merges_file=str(ASSETS / 'vocab.bpe'))
    tok.save_pretrained(directory)
    return tok


# -----------------------------------------------------------------------------
# CTranslate2


def ctranslate2_generator(hf_dir, out_dir, compute_type, threads):
    """ convert hf_dir (GPT2LMHeadModel + tokenizer files) once, then a Generator computing in compute_type """
    import ctranslate2
    out_dir = Path(out_dir)
    if not (out_dir / 'model.bin').is_file():
        converter = ctranslate2.converters.TransformersConverter(str(hf_dir))
        converter.convert(str(out_dir), quantization=None if compute_type == 'float32' else compute_type)
    return ctranslate2.Generator(str(out_dir), device='cpu', compute_type=compute_type,
                                 intra_threads=threads, inter_threads=1)


def time_ctranslate2(generator, tokenizer, idx, n):
    """ idx (B, T): a batch of prompts; streamed for one row (the first token's time), batched for more """
    prompts = [tokenizer.convert_ids_to_tokens(row) for row in idx.tolist()]
    t0 = time.perf_counter()
    if len(prompts) == 1:
        tokens, ttft = [], None
        for step in generator.generate_tokens(prompts[0], max_length=n, min_length=n, sampling_topk=1):
            tokens.append(step.token_id)
            ttft = ttft or time.perf_counter() - t0
        return ttft, time.perf_counter() - t0, tokens
    results = generator.generate_batch(prompts, max_length=n, min_length=n, sampling_topk=1,
                                       include_prompt_in_result=False)
    total = time.perf_counter() - t0
    return float('nan'), total, list(results[0].sequences_ids[0])

# -----------------------------------------------------------------------------
# llama.cpp: a GGUF file written from the transformers checkpoint, run by llama-cpp-python


def write_gguf(hf_dir, path, qtype='q8_0'):
    """
    hf_dir's GPT-2 as a GGUF file for llama.cpp: qtype 'f32', or 'q8_0' for the four matrices of
    each block and the head (the embeddings, norms and biases stay f32, as llama.cpp's converter
    keeps 1-D tensors). The head is tied to token_embd, which llama.cpp reads for a missing 'output'.
    """
    import gguf
    from safetensors.numpy import load_file
    if Path(path).is_file():
        return path  # written by an earlier process of the same benchmark
    cfg = json.loads((Path(hf_dir) / 'config.json').read_text())
    sd = {k.removeprefix('transformer.'): v for k, v in load_file(str(Path(hf_dir) / 'model.safetensors')).items()}
    tmp = Path(str(path) + '.tmp')  # renamed when whole: a process stopped mid-write leaves no GGUF behind
    w = gguf.GGUFWriter(str(tmp), 'gpt2')
    w.add_context_length(cfg['n_positions'])
    w.add_embedding_length(cfg['n_embd'])
    w.add_feed_forward_length(4 * cfg['n_embd'])
    w.add_block_count(cfg['n_layer'])
    w.add_head_count(cfg['n_head'])
    w.add_layer_norm_eps(cfg.get('layer_norm_epsilon', 1e-5))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == 'q8_0' else gguf.LlamaFileType.ALL_F32)
    encoder = json.loads((ASSETS / 'encoder.json').read_text(encoding='utf-8'))
    merges = (ASSETS / 'vocab.bpe').read_text(encoding='utf-8').split('\n')[1:]
    w.add_tokenizer_model('gpt2')
    w.add_tokenizer_pre('gpt-2')
    w.add_token_list(sorted(encoder, key=encoder.get))
    w.add_token_types([gguf.TokenType.NORMAL] * len(encoder))
    w.add_token_merges([m for m in merges if m])
    w.add_bos_token_id(50256)
    w.add_eos_token_id(50256)

    def add(name, array, matrix=False):
        array = np.ascontiguousarray(array, dtype=np.float32)
        if matrix and qtype == 'q8_0':
            w.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, array)

    add('token_embd.weight', sd['wte.weight'], matrix=True)  # also the head: q8_0 as llama.cpp makes it
    add('position_embd.weight', sd['wpe.weight'])
    for i in range(cfg['n_layer']):
        p, b = f'h.{i}.', f'blk.{i}.'
        for ours, theirs in (('ln_1', 'attn_norm'), ('ln_2', 'ffn_norm')):
            add(f'{b}{theirs}.weight', sd[f'{p}{ours}.weight'])
            add(f'{b}{theirs}.bias', sd[f'{p}{ours}.bias'])
        for ours, theirs in (('attn.c_attn', 'attn_qkv'), ('attn.c_proj', 'attn_output'),
                             ('mlp.c_fc', 'ffn_up'), ('mlp.c_proj', 'ffn_down')):
            add(f'{b}{theirs}.weight', sd[f'{p}{ours}.weight'].T, matrix=True)  # Conv1D (in, out) -> (out, in)
            add(f'{b}{theirs}.bias', sd[f'{p}{ours}.bias'])
    add('output_norm.weight', sd['ln_f.weight'])
    add('output_norm.bias', sd['ln_f.bias'])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path


def llama_cpp_model(gguf_path, threads, n_ctx):
    from llama_cpp import Llama
    return Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                 n_batch=512, verbose=False)


def time_llama_cpp(llm, idx, n):
    """ one prompt (llama-cpp-python decodes one sequence at a time), greedy """
    assert idx.size(0) == 1, "llama-cpp-python's generate runs one sequence"
    llm.reset()
    tokens, ttft = [], None
    t0 = time.perf_counter()
    for tok in llm.generate(idx[0].tolist(), top_k=1, temp=0.0, reset=True):
        tokens.append(tok)
        ttft = ttft or time.perf_counter() - t0
        if len(tokens) == n:
            break
    return ttft, time.perf_counter() - t0, tokens

