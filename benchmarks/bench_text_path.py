"""Text path of UniF²ace vs transformers' own PhiForCausalLM at an identical dense config, side by side.

Same weights in both models (copied from Phi), so the logits must agree; then a 512-token forward and a 64-token
greedy decode with the KV cache, medians of repeats, interleaved so machine noise hits both alike.

    python benchmarks/bench_text_path.py [--quick]
"""

import argparse
import statistics
import time

import torch
from transformers import PhiConfig, PhiForCausalLM

from transformers_f2ace import UniF2aceConfig, UniF2aceForConditionalGeneration


def build_models(hidden: int, layers: int, heads: int, text_vocab: int, codebook_bits: int):
    config = UniF2aceConfig(
        text_vocab_size=text_vocab,
        text_config=dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, block_style="parallel"),
        vq_config=dict(codebook_bits=codebook_bits),
        moe_config=dict(token_moe=False, sequence_moe=False),
    )
    phi_config = PhiConfig(
        vocab_size=config.vocab_size, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=config.text_config.max_position_embeddings,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
    )
    torch.manual_seed(0)
    phi = PhiForCausalLM(phi_config).eval()
    ours = UniF2aceForConditionalGeneration(config).eval()
    missing, unexpected = ours.load_state_dict(phi.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert all(not k.startswith(("model.layers", "model.embed", "lm_head", "model.final")) for k in missing), missing
    for model in (phi, ours):
        model.generation_config.eos_token_id = None  # always decode the full length
        model.generation_config.pad_token_id = config.pad_token_id
    return phi, ours


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats (smoke run)")
    args = parser.parse_args()
    hidden, layers, heads, seq, new, repeats = (512, 8, 8, 512, 64, 7) if not args.quick else (128, 2, 4, 64, 8, 3)
    phi, ours = build_models(hidden, layers, heads, text_vocab=50295, codebook_bits=13)
    ids = torch.randint(0, 50000, (1, seq))
    prompt = ids[:, :32]

    with torch.inference_mode():
        diff = (phi(ids).logits - ours(ids).logits).abs().max().item()
        print(f"max |logit difference| ours vs Phi on identical weights: {diff:.2e}")
        assert diff < 1e-3
        assert phi.generate(prompt, max_new_tokens=8, do_sample=False).tolist() == \
            ours.generate(prompt, max_new_tokens=8, do_sample=False).tolist()
        rows = []
        for name, fn_phi, fn_ours in [
            (f"forward {seq} tokens", lambda: phi(ids), lambda: ours(ids)),
            (f"greedy decode {new} tokens (cache)",
             lambda: phi.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False),
             lambda: ours.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)),
        ]:
            fn_phi(), fn_ours()  # warm-up
            t_phi, t_ours = [], []
            for _ in range(repeats):  # interleaved
                t_phi.append(median_time(fn_phi, 1))
                t_ours.append(median_time(fn_ours, 1))
            rows.append((name, statistics.median(t_phi), statistics.median(t_ours)))

    print(f"\nconfig: hidden {hidden}, {layers} layers, {heads} heads, vocab {ours.config.vocab_size}, "
          f"torch threads {torch.get_num_threads()}, medians of {repeats}")
    print(f"| {'case':38s} | {'Phi (s)':>9s} | {'ours (s)':>9s} | {'ours/Phi':>8s} |")
    print(f"|{'-' * 40}|{'-' * 11}|{'-' * 11}|{'-' * 10}|")
    for name, t_phi, t_ours in rows:
        print(f"| {name:38s} | {t_phi:9.4f} | {t_ours:9.4f} | {t_ours / t_phi:8.2f} |")


if __name__ == "__main__":
    main()
