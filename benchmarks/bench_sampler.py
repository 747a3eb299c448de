"""MaskGIT sampler overhead: T sampling steps vs T plain forwards of the same (CFG-doubled) batch, side by side.

The sampler's own per-step work (filling the grid, the image-code head, guidance, the inverse-CDF draw, confidences,
re-masking) should cost little next to the transformer forward: target T steps <= 1.10 x T forwards.

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
            model.model(doubled, attention_mask=doubled_mask, use_cache=False)

    with torch.inference_mode():
        sampler(), forwards()
        t_sampler, t_forwards = [], []
        for _ in range(args.repeats):  # interleaved
            start = time.perf_counter(); sampler(); t_sampler.append(time.perf_counter() - start)  # noqa: E702
            start = time.perf_counter(); forwards(); t_forwards.append(time.perf_counter() - start)  # noqa: E702
    s, f = statistics.median(t_sampler), statistics.median(t_forwards)
    print(f"batch {batch} (x2 for CFG), {n} image tokens, {config.codebook_size} codes, {steps} steps, "
          f"hidden {config.text_config.hidden_size}, torch threads {torch.get_num_threads()}, medians of {args.repeats}")
    print("| case | seconds | ratio |\n|---|---|---|")
    print(f"| {steps} plain forwards of the doubled batch | {f:.3f} | 1.00 |")
    print(f"| MaskGIT sampler, {steps} steps with CFG | {s:.3f} | {s / f:.2f} |")


if __name__ == "__main__":
    main()
