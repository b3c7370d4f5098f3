"""Attention maps of a trained ViT: the last block's CLS-to-patch attention (DINO's visualize_attention.py).

For each image, the CLS token's attention over the patches in the last block, softmax(q k^T / sqrt(head_dim))
of the CLS query, is drawn for each head and for the mean over heads (the SimDINO paper's Figure 5, DINO's
Figure 1), upsampled to the image (each patch a square of patch_size pixels, as DINO draws them) and coloured
over it. The thresholded maps keep the smallest set of patches that holds --threshold of the attention mass
(DINO's masks; its paper shows 0.6). Register tokens are not patches: the CLS token's attention to them is
left out and the map renormalised over the patches.

    python visualize_attention.py --checkpoint out/simdino/checkpoint.pth --images a.jpg b.jpg --output_dir attn
    python visualize_attention.py --checkpoint dinov2_vits14_reg4_pretrain.pth --images a.jpg --image_size 518

Any checkpoint vit.vit_from_checkpoint reads (DINO, DINOv2, SimDINO, SimDINOv2 releases, this project's
training checkpoints): the architecture and patch size are read off the weights, and the position embeddings
are resized to the image's patch grid as the checkpoint's own code resizes them. Each image is resized to
--image_size, rounded down to a multiple of the patch size. Written under --output_dir, per image
(<name>/, after the image file's name):

    img.png                  the image as the model saw it (resized)
    attn-mean.png            mean over heads of the CLS-to-patch attention, over the image
    attn-head<j>.png         head j
    mask-mean.png, mask-head<j>.png   the patches holding --threshold of the mass, the rest darkened
    attn.pt                  the maps themselves, (heads, grid_h, grid_w), each summing to 1, and the masks

and montage.png: one row per image (image, mean, each head, thresholded mean).

The training path's attention (vit.attention: the fused F.scaled_dot_product_attention, or two matmuls for bf16
on a CPU) returns no attention probabilities: the blocks before the last run as in training, the last one is
written out here (block_attention), and a test checks that it gives the block's own output.
"""
import argparse
import math
import os
import sys

import numpy as np
import torch
from PIL import Image

import vit
from data import IMAGENET_MEAN, IMAGENET_STD, load_image
from eval_knn import check_writable, os_problem

# matplotlib's viridis at 0, 1/8, ..., 1 (linear between the stops): perceptually even, readable in grey
VIRIDIS = np.array([[0.267004, 0.004874, 0.329415], [0.282623, 0.140926, 0.457517], [0.229739, 0.322361, 0.545706],
                    [0.172719, 0.448791, 0.557885], [0.127568, 0.566949, 0.550556], [0.157851, 0.683765, 0.501686],
                    [0.369214, 0.788888, 0.382914], [0.678489, 0.863742, 0.189503], [0.993248, 0.906157, 0.143936]])


# ----------------------------------------------------------------------------- attention

def block_attention(blk, x):
    """One vit.Block written out, as its forward computes it in eval mode (no drop path):
    (attention probabilities (B, heads, T, T), the block's output (B, T, D)) for its input tokens x (B, T, D)."""
    B, T, D = x.shape
    h = blk.attn.num_heads
    qkv = blk.attn.qkv(blk.norm1(x)).reshape(B, T, 3, h, D // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)                                                        # each (B, h, T, D/h)
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // h), dim=-1)      # (B, h, T, T), rows sum to 1
    y = blk.attn.proj((attn @ v).transpose(1, 2).reshape(B, T, D))                 # (B, T, D)
    x = x + blk.ls1(y)
    x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return attn, x


@torch.no_grad()
def last_attention(model, images):
    """Attention probabilities (B, heads, T, T) of the last block, T = 1 + registers + patches, for (B, 3, H, W)."""
    x = model.prepare_tokens(images)                                               # (B, 1 + R + N, D)
    for blk in model.blocks[:-1]:
        x = blk(x)
    return block_attention(model.blocks[-1], x)[0]


def cls_attention_maps(model, images):
    """The CLS token's attention over the patches, (B, heads, H/p, W/p): register tokens left out, each map
    renormalised to sum to 1 over the patches (without registers it already does, less the CLS-to-CLS weight)."""
    p, (H, W) = model.patch_size, images.shape[-2:]
    attn = last_attention(model, images)[:, :, 0, 1 + model.num_register_tokens:]  # (B, h, N): CLS query, patch keys
    attn = attn / attn.sum(-1, keepdim=True)
    return attn.reshape(*attn.shape[:2], H // p, W // p)


def threshold_mask(maps, threshold):
    """DINO's thresholded attention: per map, the patches whose attention, summed from the largest down, first
    reaches `threshold` of the map's mass (the smallest such set). maps (..., h, w) -> bool masks (..., h, w)."""
    flat = maps.flatten(-2)
    flat = flat / flat.sum(-1, keepdim=True)
    vals, idx = torch.sort(flat, dim=-1)                                           # ascending
    keep_sorted = torch.cumsum(vals, dim=-1) > 1 - threshold                       # DINO: cumval > 1 - threshold
    keep = torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)
    return keep.reshape(maps.shape)


# ----------------------------------------------------------------------------- drawing (numpy + PIL only)

def colormap(values):
    """values in [0, 1], any shape -> RGB float array (..., 3) in [0, 1], viridis."""
    pos = np.clip(values, 0, 1) * (len(VIRIDIS) - 1)
    lo = np.minimum(pos.astype(int), len(VIRIDIS) - 2)
    frac = (pos - lo)[..., None]
    return VIRIDIS[lo] * (1 - frac) + VIRIDIS[lo + 1] * frac


def upsample(grid, patch_size):
    """(h, w) -> (h*p, w*p): each patch a p x p square, as DINO upsamples (nearest)."""
    return np.kron(grid, np.ones((patch_size, patch_size), dtype=grid.dtype))


def overlay(image, attn_map, patch_size, alpha=0.6):
    """The map scaled to its own min..max (as DINO's plt.imsave does), coloured, over the image (H, W, 3) uint8."""
    a = attn_map.astype(np.float64)
    a = (a - a.min()) / max(a.max() - a.min(), 1e-12)
    rgb = (1 - alpha) * image / 255.0 + alpha * colormap(upsample(a, patch_size))
    return (rgb * 255).round().astype(np.uint8)


def masked(image, mask, patch_size, dim=0.2):
    """The image where the mask keeps patches, darkened to `dim` elsewhere, (H, W, 3) uint8."""
    m = upsample(mask.astype(np.float64), patch_size)[..., None]
    return (image * (m + (1 - m) * dim)).round().astype(np.uint8)


def montage(rows, gap=2):
    """Rows of equally sized (H, W, 3) uint8 tiles -> one image, `gap` white pixels between tiles."""
    H, W = rows[0][0].shape[:2]
    n = max(len(r) for r in rows)
    out = np.full((len(rows) * (H + gap) - gap, n * (W + gap) - gap, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            out[i * (H + gap):i * (H + gap) + H, j * (W + gap):j * (W + gap) + W] = tile
    return out


# ----------------------------------------------------------------------------- command line

def fail(msg):
    """Stop with a one-line message and a non-zero exit code, no traceback."""
    sys.exit(f"error: {msg}")


def get_args(argv=None):
    p = argparse.ArgumentParser("visualize_attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", "--pretrained_weights", required=True,
                   help="""One of this project's training checkpoints, a bare ViT state dict, or the authors' released
                   DINO / DINOv2 / SimDINO / SimDINOv2 files. Architecture, patch size and registers are read off the
                   weights (DINO's --arch and --patch_size are not needed).""")
    p.add_argument("--checkpoint_key", default="teacher", choices=["teacher", "student"],
                   help="Which network of a training checkpoint to show (DINO's default: teacher).")
    p.add_argument("--images", "--image_path", nargs="+", required=True,
                   help="Image files (anything PIL reads), one row of montage.png each.")
    p.add_argument("--image_size", nargs="+", type=int, default=[480, 480],
                   help="""Size the images are resized to (bicubic), one value (square) or H W, rounded down to a
                   multiple of the patch size (DINO: 480 480). The patch grid is size / patch size; a model trained
                   at smaller crops is run at this size with its position embeddings resized.""")
    p.add_argument("--threshold", type=float, default=0.6,
                   help="""Fraction of the attention mass the thresholded maps keep, in (0, 1] (the DINO paper's
                   figures: 0.6).""")
    p.add_argument("--output_dir", default=".", help="Folder for the PNGs (created if needed).")
    return p.parse_args(argv)


def image_hw(args, patch_size):
    if len(args.image_size) not in (1, 2):
        fail(f"--image_size takes one value or two (H W), not {len(args.image_size)}")
    h, w = args.image_size if len(args.image_size) == 2 else args.image_size * 2
    if min(h, w) < patch_size:
        fail(f"--image_size {h} {w} is smaller than the checkpoint's patch size {patch_size}: "
             f"pass at least {patch_size}")
    return h // patch_size * patch_size, w // patch_size * patch_size


def read_image(path, h, w):
    """(H, W, 3) uint8 of the image resized to h x w, decoded as the training and evaluation scripts decode it
    (data.load_image); a missing or unreadable file stops with one line."""
    try:
        return np.array(load_image(path).resize((w, h), Image.BICUBIC))
    except FileNotFoundError:
        fail(f"image '{path}' does not exist: pass image files to --images")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        fail(f"image '{path}' could not be read ({type(e).__name__}): pass image files PIL can open (JPEG, PNG, ...)")


def output_names(paths):
    """A folder name per image: the file's name without extension; <parent folder>-<name> where two images share
    a name (ImageFolder trees: test/bird/0000.jpg, test/ship/0000.jpg), numbered if that is shared too."""
    stems = [os.path.splitext(os.path.basename(p))[0] or "image" for p in paths]
    parents = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
    names = [f"{parent}-{stem}" if stems.count(stem) > 1 else stem for stem, parent in zip(stems, parents)]
    seen, out = {}, []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def save_png(array, path):
    try:
        Image.fromarray(array).save(path)
    except OSError as e:
        fail(f"cannot write {path}: {os_problem(e)}; pass --output_dir DIR where this user can write")


def main(args):
    if not 0 < args.threshold <= 1:
        fail(f"--threshold {args.threshold} must be in (0, 1]: the fraction of the attention mass kept")
    check_writable(os.path.join(args.output_dir, "montage.png"), "pass --output_dir DIR where this user can write")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = vit.vit_from_checkpoint(args.checkpoint, which=args.checkpoint_key).eval().to(device)
    p = model.patch_size
    h, w = image_hw(args, p)
    images = [read_image(path, h, w) for path in args.images]                     # every image read before any work
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    os.makedirs(args.output_dir, exist_ok=True)
    rows = []
    print(f"{vit.describe(model)}; {args.checkpoint_key} of {args.checkpoint}; images at {h}x{w} px, "
          f"a {h // p}x{w // p} patch grid")
    for path, name, image in zip(args.images, output_names(args.images), images):
        x = ((torch.from_numpy(image).permute(2, 0, 1).float() / 255 - mean) / std).unsqueeze(0).to(device)
        heads = cls_attention_maps(model, x)[0].float().cpu()                     # (h, H/p, W/p)
        maps = torch.cat([heads.mean(0, keepdim=True), heads])                    # mean over heads first
        masks = threshold_mask(maps, args.threshold)
        folder = os.path.join(args.output_dir, name)
        os.makedirs(folder, exist_ok=True)
        save_png(image, os.path.join(folder, "img.png"))
        tiles = [image]
        for i, label in enumerate(["mean"] + [f"head{j}" for j in range(len(heads))]):
            attn_png = overlay(image, maps[i].numpy(), p)
            save_png(attn_png, os.path.join(folder, f"attn-{label}.png"))
            save_png(masked(image, masks[i].numpy(), p), os.path.join(folder, f"mask-{label}.png"))
            tiles.append(attn_png)
        tiles.append(masked(image, masks[0].numpy(), p))
        torch.save({"heads": heads, "mean": maps[0], "masks": masks, "threshold": args.threshold,
                    "image": path, "image_size": (h, w), "patch_size": p}, os.path.join(folder, "attn.pt"))
        rows.append(tiles)
        kept = masks[0].sum().item()
        print(f"{path}: {folder}/ (mean map: {kept} of {masks[0].numel()} patches hold {args.threshold:g} of the mass)")
    save_png(montage(rows), os.path.join(args.output_dir, "montage.png"))
    print(f"montage: {os.path.join(args.output_dir, 'montage.png')} (image, mean, {len(heads)} heads, "
          f"thresholded mean)")


def cli(argv=None):
    try:
        main(get_args(argv))
    except vit.CheckpointError as e:
        fail(e)


if __name__ == "__main__":
    cli()
