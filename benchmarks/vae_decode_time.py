"""Seconds per decoded image of the SD-VAE decoder (fid.py calc on latent models), measured on this machine.

    python benchmarks/vae_decode_time.py [--batch 8] [--repeats 3] [--device cpu] [--dtype fp32]

The weights of stabilityai/sd-vae-ft-mse need a download; the time does not depend on them, so this builds diffusers'
AutoencoderKL with that model's configuration (4 latent channels, block widths 128-256-512-512, 2 layers per block,
83.7 M parameters) and random weights, and decodes (B, 4, 32, 32) latents to (B, 3, 256, 256) images under no_grad.
Prints the seconds per image and the implied time for 50,000 images.
"""
import argparse
import time

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    args = p.parse_args()
    from diffusers.models import AutoencoderKL  # pip install diffusers
    block = ("DownEncoderBlock2D",) * 4
    up = ("UpDecoderBlock2D",) * 4
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=block, up_block_types=up,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        norm_num_groups=32, sample_size=256)
    dt = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)[args.dtype]
    vae = vae.to(args.device, dt).eval().requires_grad_(False)
    params = sum(t.numel() for t in vae.parameters())
    decoder_params = sum(t.numel() for n, t in vae.named_parameters() if n.startswith(("decoder", "post_quant")))
    z = torch.randn(args.batch, 4, 32, 32, device=args.device, dtype=dt)
    times = []
    with torch.no_grad():
        vae.decode(z[:1])  # warm-up
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            x = vae.decode(z).sample
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    per_image = min(times) / args.batch
    print(f"AutoencoderKL (sd-vae-ft-mse config): {params / 1e6:.1f} M parameters, decoder {decoder_params / 1e6:.1f} M; "
          f"output {tuple(x.shape)}")
    print(f"{args.device} {args.dtype} {torch.get_num_threads()} threads, batch {args.batch}: {per_image:.3f} s per "
          f"image (best of {args.repeats}); 50,000 images: {per_image * 50_000 / 3600:.2f} h")


if __name__ == "__main__":
    main()
