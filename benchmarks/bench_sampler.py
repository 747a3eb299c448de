"""MaskGIT sampler overhead: T sampling steps vs T single forwards of the same (CFG-doubled) batch, side by side.

A single forward is one model call that yields the image logits: `model(ids, logits_to_keep=N + 1)` (decoder plus
the LM head on the image span). The sampler's own per-step work (filling the grid, guidance, the inverse-CDF draw,
confidences, re-masking) should cost little next to it: target T steps <= 1.10 x T forwards.

    python benchmarks/bench_sampler.py [--quick]
"""

import argparse
import statistics
import time

import torch

from transformers_f2ace import UniF2aceConfig, UniF2aceForConditionalGeneration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke run)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.quick:
        config, batch, steps = UniF2aceConfig.tiny(), 2, 4
    else:  # 256 image tokens of an 8192-code VQ (the paper's tokenizer) on a small decoder
        config = UniF2aceConfig(
            text_vocab_size=4096,
            text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8),
            vq_config=dict(resolution=256, base_channels=16, codebook_bits=13),
            moe_config=dict(expert_intermediate_size=256, shared_expert_intermediate_size=512),
            semantic_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=64, patch_size=16),
            identity_config=dict(image_size=64, layers=[1, 1, 1, 1], base_channels=8, embedding_size=64),
            bos_token_id=0, eos_token_id=0,
        )
        batch, steps = 4, 16
    torch.manual_seed(0)
    model = UniF2aceForConditionalGeneration(config).eval()
    n = config.num_image_tokens
    prompt = torch.randint(1, 1000, (batch, 24))
    column = lambda token: torch.full((batch, 1), token)  # noqa: E731
    ids = torch.cat([column(config.t2i_token_id), column(config.bos_token_id), prompt, column(config.eos_token_id),
                     column(config.soi_token_id), column(config.mask_token_id).repeat(1, n), column(config.eoi_token_id)], 1)
    mask = torch.ones_like(ids)
    doubled, doubled_mask = torch.cat([ids, ids]), torch.cat([mask, mask])

    def sampler():
        model.generate_image_tokens(ids, mask, num_inference_steps=steps, guidance_scale=1.75,
                                    generator=torch.Generator().manual_seed(0), progress=False)

    def forwards():
        for _ in range(steps):
            model(doubled, attention_mask=doubled_mask, use_cache=False, logits_to_keep=n + 1)

    def decoder_only():  # the lower bound: the decoder without any LM head
        for _ in range(steps):
            model.model(doubled, attention_mask=doubled_mask, use_cache=False)

    cases = {"sampler": sampler, "forwards": forwards, "decoder": decoder_only}
    times = {name: [] for name in cases}
    with torch.inference_mode():
        for fn in cases.values():
            fn()  # warm-up
        for _ in range(args.repeats):  # interleaved
            for name, fn in cases.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    s, f, d = (statistics.median(times[name]) for name in cases)
    print(f"batch {batch} (x2 for CFG), {n} image tokens, {config.codebook_size} codes, {steps} steps, "
          f"hidden {config.text_config.hidden_size}, torch threads {torch.get_num_threads()}, medians of {args.repeats}")
    print("| case | seconds | ratio |\n|---|---|---|")
    print(f"| {steps} single forwards of the doubled batch (image-span logits) | {f:.3f} | 1.00 |")
    print(f"| {steps} decoder-only forwards (no LM head: a lower bound) | {d:.3f} | {d / f:.2f} |")
    print(f"| MaskGIT sampler, {steps} steps with CFG | {s:.3f} | {s / f:.2f} |")


if __name__ == "__main__":
    main()
