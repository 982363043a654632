"""Exact tiles: the split graphs, the halo from the architecture, and the tile placement.

The VAE's norms are per pixel (RMS over channels) and its only global operation is the mid-block attention, at
latent resolution. So each graph splits into a global part run once over the whole latent and a local part run on
overlapping windows, cropped:

    decoder = DecoderTail(DecoderHead(latents))   head: post_quant_conv, decoder.conv_in, decoder.mid_block
                                                  tail: decoder.up_blocks, norm_out, SiLU, conv_out, clamp
    encoder = EncoderRest(EncoderDown(images))    down: encoder.conv_in, encoder.down_blocks
                                                  rest: encoder.mid_block, norm_out, SiLU, conv_out, quant_conv

(the order of diffusers' `QwenImageDecoder3d.forward` / `QwenImageEncoder3d.forward`). The split modules keep
the graph modules' attribute paths (`decoder.up_blocks.*`, `quant_conv.*`, ...), so their tensors have the names
of a folder's `weights.safetensors`.

Halo: `tail_extent` / `down_extent` walk the local part's layers (every convolution's kernel, stride and padding,
every nearest x2 upsample, in forward order; the residual shortcuts are 1x1 and never reach further) and propagate
the interval of inputs an output interval depends on, back to the window's input. The halo is the farthest reach
beyond the core on either side: in latent pixels for the decoder tail; in image pixels for the encoder down path,
rounded up to a multiple of the downsampling (8), so every window starts on the stride-2 convolutions' grid.

Placement (`decoder_tiles`, `encoder_tiles`): along each axis the fewest cores of at most `tile` pixels, of equal
length (within a latent pixel), so no window is a thin leftover and the largest window is as small as it can be;
each window is the core plus the halo on every side, clipped to the input, so at the borders the window sees the
real zero padding; the window's output is cropped to the core's part. Windows of an image smaller than one tile
are the whole image.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from vaebuild.model import TILE_GRAPHS
# graph -> (input name, output name) of its package
TILE_IO = {
    "decoder_head": ("latents", "features"),
    "decoder_tail": ("features", "images"),
    "encoder_down": ("images", "features"),
    "encoder_rest": ("features", "latents"),
}
TILE_PARENT = {"decoder_head": "decoder", "decoder_tail": "decoder", "encoder_down": "encoder",
               "encoder_rest": "encoder"}


def _container(**children):
    module = nn.Module()
    for name, child in children.items():
        setattr(module, name, child)
    return module


class DecoderHead(nn.Module):
    """`decoder.mid_block(decoder.conv_in(post_quant_conv(latents)))`: run once over the whole latent."""

    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = _container(conv_in=vae.decoder.conv_in, mid_block=vae.decoder.mid_block)

    def forward(self, latents):
        return self.decoder.mid_block(self.decoder.conv_in(self.post_quant_conv(latents)))


class DecoderTail(nn.Module):
    """`clamp(conv_out(SiLU(norm_out(up_blocks(features)))), -1, 1)`: local, run on windows."""

    def __init__(self, vae):
        super().__init__()
        d = vae.decoder
        self.decoder = _container(up_blocks=d.up_blocks, norm_out=d.norm_out, nonlinearity=d.nonlinearity,
                                  conv_out=d.conv_out)

    def forward(self, features):
        d = self.decoder
        x = features
        for block in d.up_blocks:
            x = block(x)
        return torch.clamp(d.conv_out(d.nonlinearity(d.norm_out(x))), -1.0, 1.0)


class EncoderDown(nn.Module):
    """`down_blocks(encoder.conv_in(images))`: local, run on windows."""

    def __init__(self, vae):
        super().__init__()
        self.encoder = _container(conv_in=vae.encoder.conv_in, down_blocks=vae.encoder.down_blocks)

    def forward(self, images):
        x = self.encoder.conv_in(images)
        for layer in self.encoder.down_blocks:
            x = layer(x)
        return x


class EncoderRest(nn.Module):
    """`quant_conv(conv_out(SiLU(norm_out(mid_block(features)))))`: run once over the whole latent."""

    def __init__(self, vae):
        super().__init__()
        e = vae.encoder
        self.encoder = _container(mid_block=e.mid_block, norm_out=e.norm_out, nonlinearity=e.nonlinearity,
                                  conv_out=e.conv_out)
        self.quant_conv = vae.quant_conv

    def forward(self, features):
        e = self.encoder
        return self.quant_conv(e.conv_out(e.nonlinearity(e.norm_out(e.mid_block(features)))))


TILE_MODULES = {"decoder_head": DecoderHead, "decoder_tail": DecoderTail, "encoder_down": EncoderDown,
                "encoder_rest": EncoderRest}


def build_tile_graphs(vae, fold=True, **fold_options):
    """{graph: module} of the four split graphs of `vae` (folded to 2-D with `fold`; `fold_options` as
    `graphs.build_graphs`). Also accepts an `EncoderGraph`/`DecoderGraph`-like object holding the submodules."""
    if fold:
        from vaebuild.model.single_frame import fold_single_frame

        vae = fold_single_frame(vae, **fold_options)
    return {name: TILE_MODULES[name](vae).eval() for name in TILE_GRAPHS}


# ---------------------------------------------------------------------- the halo from the architecture


def _conv_op(conv):
    """("conv", kernel, stride, pad_before) along one spatial axis (height; the layers are square) of a diffusers
    or folded convolution; None for a 1x1 convolution (reaches nowhere)."""
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

    if isinstance(conv, QwenImageCausalConv3d):
        kernel, stride, pad = conv.kernel_size[1], conv.stride[1], conv._padding[2]
    elif isinstance(conv, nn.Conv2d):
        kernel, stride, pad = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    elif hasattr(conv, "conv") and isinstance(conv.conv, nn.Conv2d):  # SingleFrameConv
        kernel, stride, pad = conv.conv.kernel_size[0], conv.conv.stride[0], conv.conv.padding[0]
    else:
        raise ValueError(f"unexpected convolution {type(conv).__name__}: cannot compute its receptive field")
    return None if kernel == 1 and stride == 1 else ("conv", kernel, stride, pad)


def _layer_ops(layer):
    """The ops of one diffusers block, in forward order: ("conv", k, s, pad_before), ("pad", before), ("up", 2)."""
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import (
        QwenImageAttentionBlock,
        QwenImageResample,
        QwenImageResidualBlock,
        QwenImageUpBlock,
    )

    if isinstance(layer, QwenImageResidualBlock):
        return [op for op in (_conv_op(layer.conv1), _conv_op(layer.conv2)) if op]  # shortcut: 1x1
    if isinstance(layer, QwenImageUpBlock):
        ops = [op for resnet in layer.resnets for op in _layer_ops(resnet)]
        if layer.upsamplers is not None:
            ops += _layer_ops(layer.upsamplers[0])
        return ops
    if isinstance(layer, QwenImageResample):
        ops = []
        for part in layer.resample if isinstance(layer.resample, nn.Sequential) else [layer.resample]:
            if isinstance(part, nn.ZeroPad2d):
                left, right, top, bottom = part.padding
                ops.append(("pad", top))
            elif isinstance(part, nn.Upsample):
                factor = part.scale_factor[0] if isinstance(part.scale_factor, tuple) else part.scale_factor
                if float(factor) != 2.0 or part.mode not in ("nearest", "nearest-exact"):
                    raise ValueError(f"unexpected upsampler {part}: only nearest x2 is tiled")
                ops.append(("up", 2))
            elif isinstance(part, nn.Identity):
                continue
            else:
                op = _conv_op(part)
                if op:
                    ops.append(op)
        return ops
    if isinstance(layer, QwenImageAttentionBlock):
        raise ValueError("an attention block outside the mid block is global: this architecture cannot be tiled")
    raise ValueError(f"unexpected layer {type(layer).__name__}: cannot compute its receptive field")


def tail_ops(decoder):
    """The decoder tail's spatial ops in forward order (a diffusers `QwenImageDecoder3d`)."""
    ops = [op for block in decoder.up_blocks for op in _layer_ops(block)]
    return ops + [op for op in [_conv_op(decoder.conv_out)] if op]


def down_ops(encoder):
    """The encoder down path's spatial ops in forward order (a diffusers `QwenImageEncoder3d`)."""
    ops = [op for op in [_conv_op(encoder.conv_in)] if op]
    return ops + [op for layer in encoder.down_blocks for op in _layer_ops(layer)]


def input_interval(ops, lo, hi):
    """The input interval [lo', hi') that the output interval [lo, hi) of `ops` (forward order) depends on.

    Backwards through a convolution (kernel k, stride s, padding p before): output j reads inputs s*j - p ..
    s*j - p + k - 1; through a zero pad of p before: index i of the padded tensor is i - p of its input; through a
    nearest x2 upsample: output j reads input floor(j / 2).
    """
    for op in reversed(ops):
        if op[0] == "conv":
            _, kernel, stride, pad = op
            lo, hi = stride * lo - pad, stride * (hi - 1) - pad + kernel
        elif op[0] == "pad":
            lo, hi = lo - op[1], hi - op[1]
        elif op[0] == "up":
            lo, hi = math.floor(lo / op[1]), math.ceil(hi / op[1])
    return lo, hi


def _scale(ops):
    """Output side / input side of `ops` (a power of two: upsamples and strides)."""
    scale = 1.0
    for op in ops:
        if op[0] == "up":
            scale *= op[1]
        elif op[0] == "conv":
            scale /= op[2]
    return scale


def decoder_tail_halo(vae):
    """The decoder tail's halo in latent pixels: the farthest latent pixel beyond a core that its output reads."""
    ops = tail_ops(vae.decoder)
    up = round(_scale(ops))  # output pixels per latent pixel
    # A core of whole latent pixels: its output interval starts on the 8x grid, so every resolution stays aligned
    # and the reach does not depend on where the core starts.
    core = 4
    lo, hi = input_interval(ops, 0, core * up)
    return max(-lo, hi - core, 0)


def encoder_down_halo(vae):
    """The encoder down path's halo in image pixels, rounded up to a multiple of its downsampling."""
    ops = down_ops(vae.encoder)
    down = round(1 / _scale(ops))  # image pixels per output (latent) pixel
    core = 4  # latent pixels, starting on the grid (a multiple of `down` image pixels)
    lo, hi = input_interval(ops, 0, core)
    reach = max(-lo, hi - core * down, 0)
    return down * math.ceil(reach / down)


def spatial_ratio(vae):
    """Image pixels per latent pixel of `vae`'s encoder down path (and decoder tail)."""
    return round(1 / _scale(down_ops(vae.encoder)))


def architecture(vae_config):
    """A diffusers `AutoencoderKLQwenImage` of `vae_config` on the meta device (no memory): for the halos."""
    from diffusers import AutoencoderKLQwenImage

    with torch.device("meta"):
        return AutoencoderKLQwenImage.from_config(vae_config)


@dataclass(frozen=True)
class Halos:
    """The halos of an architecture: decoder tail in latent pixels, encoder down path in image pixels."""

    decoder: int
    encoder: int
    ratio: int  # image pixels per latent pixel


def halos(vae_or_config):
    """`Halos` of a VAE or of its config (a dict)."""
    vae = architecture(vae_or_config) if isinstance(vae_or_config, dict) else vae_or_config
    return Halos(decoder_tail_halo(vae), encoder_down_halo(vae), spatial_ratio(vae))


# ---------------------------------------------------------------------- placement


def axis_tiles(size, core, halo, unit=1):
    """[(window start, window end, core start, core end)] along one axis of `size` pixels: the fewest cores of at
    most `core` pixels, of equal length within one `unit` (cores start and end on multiples of `unit`); windows =
    core +- halo clipped to [0, size)."""
    if core <= 0 or halo < 0 or size <= 0 or unit <= 0 or size % unit or core % unit:
        raise ValueError(f"axis_tiles needs size, core > 0 and halo >= 0, size and core multiples of unit, "
                         f"got {size}, {core}, {halo}, {unit}")
    count = -(-size // core)
    units, longer = divmod(size // unit, count)  # the first `longer` cores get one unit more
    tiles, start = [], 0
    for index in range(count):
        end = start + (units + (index < longer)) * unit
        tiles.append((max(0, start - halo), min(size, end + halo), start, end))
        start = end
    return tiles


@dataclass(frozen=True)
class Tile:
    """One window: `window` (slices of the local part's input), `crop` (slices of the window's output that belong
    to the core) and `output` (where that crop goes in the whole output)."""

    window: tuple[slice, slice]
    crop: tuple[slice, slice]
    output: tuple[slice, slice]


def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


def _tiles(hw, core, halo, in_per_out, unit=1):
    """Tiles over an input of `hw`; `core` (an int or (h, w)), `halo` and the cores' `unit` in input pixels; the
    output has 1/in_per_out the side."""
    axes = []
    for size, core in zip(hw, _pair(core)):
        axis = []
        for w0, w1, c0, c1 in axis_tiles(size, core, halo, unit):
            crop = slice(_div(c0 - w0, in_per_out), _div(c1 - w0, in_per_out))
            axis.append((slice(w0, w1), crop, slice(_div(c0, in_per_out), _div(c1, in_per_out))))
        axes.append(axis)
    return [Tile((wh, ww), (ch, cw), (oh, ow)) for wh, ch, oh in axes[0] for ww, cw, ow in axes[1]]


def _div(pixels, in_per_out):
    value = pixels / in_per_out
    if value != int(value):
        raise ValueError(f"{pixels} input pixels are not a whole number of output pixels ({in_per_out} per pixel)")
    return int(value)


def decoder_tiles(latent_hw, tile, halo, scale=8):
    """Tiles of a latent of `latent_hw`: cores of `tile` (an int or (h, w)) latent pixels, windows +- `halo` latent pixels; crops and
    output slices in image pixels (`scale` per latent pixel)."""
    return _tiles(latent_hw, tile, halo, 1 / scale)


def encoder_tiles(image_hw, tile, halo, scale=8):
    """Tiles of an image of `image_hw` (multiples of `scale`): cores of `tile` (an int or (h, w)) image pixels, windows +- `halo`
    image pixels (both multiples of `scale`); crops and output slices in latent pixels."""
    checked = [("image size", image_hw[0]), ("image size", image_hw[1]), *(("tile", t) for t in _pair(tile)), ("halo", halo)]
    for name, value in checked:
        if value % scale:
            raise ValueError(f"encoder tiles need a {name} that is a multiple of {scale}, got {value}")
    return _tiles(image_hw, tile, halo, scale, unit=scale)
