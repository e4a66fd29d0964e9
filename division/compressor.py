"""The object each converted layer calls to compress its input: the config plus a sharing cache.

One Compressor is made per `convert_model` call and handed to every layer it creates (no global
state). When `share_inputs` is on, a tensor read by several converted layers within one forward of
the model (a ResNet block input read by conv1 and by the downsample conv) is compressed once: the
cache maps the tensor to its record, valid while the tensor is unmodified (same `_version`) and
within the same forward of the root module. Under torch.compile the cache is skipped (dynamo
cannot trace a weak-keyed dictionary, and tensors kept in Python state would become graph
outputs); the graph shares instead: see below.

`kernels` says whether the layers run the compiled ops (decided once, from the config and whether
division._C is loaded), so that traced code never asks.

Random numbers: one seed is drawn per forward of the root module (on the device of the first
activation compressed), and the forward's compressions number their planes as one sequence under
it (format.py: the hash's plane index is 64-bit). One `randint` a step instead of one per layer,
the same distinct streams, and `torch.manual_seed` still reproduces a run. Under torch.compile a
Python counter would be a guard that changes every call: there the forward's seed (drawn in the
graph) is mixed with a key of the tensor's content (hashing.content_seed) and planes are numbered
from 0. Two compressions of one tensor are then the same op on the same inputs, which the
compiled graph's common-subexpression elimination keeps once, as eager's cache does (and so are
their two decompressions in backward); different tensors get different seeds unless their 256
probed elements are bit for bit the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .backend import check_tensor, kernels_allowed
from .codec import PLANE_INDEX_END, encode
from .config import DivisionConfig
from .format import SUPPORTED_DTYPES, CompressedActivation, division_plane_bytes
from .hashing import content_seed, draw_seed
from .tokens import TokenGrids


@dataclass
class _Entry:
    generation: int
    version: int
    mode: str
    bits: int
    packed: CompressedActivation


class Compressor:
    def __init__(self, cfg: DivisionConfig) -> None:
        self.cfg = cfg
        self.kernels = kernels_allowed(cfg)
        self.generation = 0
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.shared_hits = 0  # how many compressions sharing saved (for tests and summaries)
        self.token_grid: TokenGrids | None = None  # the patch grid(s) of (N, T, D) inputs (tokens.py)
        # per device: this forward's seed (drawn at its first compression there) and the hash's
        # index of the next plane compressed under it; replaced whole, so threads never mix them
        self._streams: dict[torch.device, tuple[torch.Tensor, int]] = {}
        self._forward_seed: torch.Tensor | None = None  # under torch.compile (_compiled_seed)
        # the config at other HFC widths (_with_bits), made here and in at_bits, before any call:
        # a dict that a compiled call filled in would fail its guard and recompile the next call
        self._configs: dict[int, DivisionConfig] = {}
        self._with_bits(cfg.activation_bits)
        self._at_bits: dict[int, BitsCompressor] = {}  # views for DivisionConfig.layer_bits (at_bits)
        # eager: the tensors converted convolutions and norms gave in this forward, which a GELU
        # whose layer does not say how its 4-D input lies takes as (N, C, *spatial) maps; tracked
        # only where convert_model found such a GELU
        self.track_conv_maps = False
        self._conv_maps: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def new_forward(self) -> None:
        """Called before each forward of the root module: earlier records stop being reusable,
        and the next compression draws a new seed."""
        self.generation += 1
        self._entries = WeakIdKeyDictionary()
        self._conv_maps = WeakIdKeyDictionary()
        self._streams = {}
        self._forward_seed = None

    def encode(self, x: torch.Tensor, mode: str, bits: int | None = None) -> CompressedActivation:
        """One compression, uncached (with `bits` HFC bits instead of the config's); subclasses
        swap the codec here (see groupquant.py)."""
        check_tensor(x, self.cfg, self.kernels)
        cfg = self._with_bits(bits)
        if x.dim() < 2:  # encode rejects it
            return encode(x, cfg, mode, self.kernels)
        if torch.compiler.is_compiling():  # without sharing, a fresh draw: no two calls alike
            seed = content_seed(self._compiled_seed(x.device), x) if cfg.share_inputs else None
            return encode(x, cfg, mode, self.kernels, seed)
        seed, first_plane = self._planes(x.device, x.shape[0] * x.shape[1])
        return encode(x, cfg, mode, self.kernels, seed, first_plane)

    def record_mode(self, x: torch.Tensor, mode: str, bits: int) -> str:
        """`mode`, or "exact" where a division record of x would hold at least x's own bytes: planes
        of one or a few elements (a squeeze-and-excitation's (N, C, 1, 1) inputs) are kept whole,
        exactly and in less memory, as stock keeps them. Not under torch.compile, where the sizes
        may be symbolic and the test would add a guard of their arithmetic to every layer."""
        if (mode != "division" or not 3 <= x.dim() <= 5 or x.dtype not in SUPPORTED_DTYPES
                or torch.compiler.is_compiling()):
            return mode
        spatial = tuple(x.shape[2:])
        record = division_plane_bytes(spatial, self.cfg.block_size, bits, self.cfg.lfc_torch_dtype)
        return "exact" if record >= math.prod(spatial) * x.element_size() else mode

    def _with_bits(self, bits: int | None) -> DivisionConfig:
        """The config with `bits` HFC bits (made once per width)."""
        if bits is None or bits == self.cfg.hfc_bits:
            return self.cfg
        if bits not in self._configs:
            self._configs[bits] = self.cfg.replace(hfc_bits=bits)
        return self._configs[bits]

    def _compiled_seed(self, device: torch.device) -> torch.Tensor:
        """Under torch.compile: this forward's seed (drawn in the graph at its first compression;
        the root's pre-hook forgets the last one)."""
        if self._forward_seed is None or self._forward_seed.device != device:
            self._forward_seed = draw_seed(device)
        return self._forward_seed

    def _planes(self, device: torch.device, planes: int) -> tuple[torch.Tensor, int]:
        """This forward's seed on `device` and the first of `planes` fresh plane indices under it."""
        stream = self._streams.get(device)
        if stream is None or stream[1] > PLANE_INDEX_END - planes:
            stream = (draw_seed(device), 0)
        seed, first = stream
        self._streams[device] = (seed, first + planes)
        return seed, first

    def compress(self, x: torch.Tensor, mode: str | None = None, bits: int | None = None) -> CompressedActivation:
        """x's record in `mode` (the config's backward_mode by default) with `bits` HFC bits (the
        config's hfc_bits by default), shared with the other layers that read x in this forward."""
        bits = self.cfg.hfc_bits if bits is None else bits
        mode = self.record_mode(x, self.cfg.backward_mode if mode is None else mode, bits)
        if mode == "exact":  # exact records hold x itself: nothing to compress or share
            return encode(x, self.cfg, mode, self.kernels)
        if not self.cfg.share_inputs or torch.compiler.is_compiling():
            return self.encode(x, mode, bits)
        entry = self._entries.get(x)
        if (
            entry is not None
            and entry.generation == self.generation
            and entry.version == x._version
            and entry.mode == mode
            and entry.bits == bits
        ):
            self.shared_hits += 1
            return entry.packed
        packed = self.encode(x, mode, bits)
        self._entries[x] = _Entry(self.generation, x._version, mode, bits, packed)
        return packed

    def mark_conv_map(self, y: torch.Tensor) -> torch.Tensor:
        """y, an (N, C, *spatial) map a converted convolution or norm gave, noted for is_conv_map."""
        if self.track_conv_maps and not torch.compiler.is_compiling():
            self._conv_maps[y] = True
        return y

    def is_conv_map(self, x: torch.Tensor) -> bool:
        """Whether x is, as it is (not a view of it), a map a converted convolution or norm gave in
        this forward (never under torch.compile, which cannot trace the weak dictionary)."""
        return self.track_conv_maps and not torch.compiler.is_compiling() and x in self._conv_maps

    def at_bits(self, bits: int) -> BitsCompressor:
        """This compressor as seen by layers whose records take `bits` HFC bits (layer_bits)."""
        if bits not in self._at_bits:
            self._with_bits(bits)
            self._at_bits[bits] = BitsCompressor(self, bits)
        return self._at_bits[bits]

    def __call__(self, module: object, args: object) -> None:
        """Forward pre-hook of the converted root module (under compile: a new seed only; the
        cache is unused there)."""
        if torch.compiler.is_compiling():
            self._forward_seed = None
        else:
            self.new_forward()

    def __deepcopy__(self, memo: dict) -> Compressor:
        new = Compressor(self.cfg)  # a copied model starts with an empty cache
        new.token_grid, new.track_conv_maps = self.token_grid, self.track_conv_maps
        return new

    def __getstate__(self) -> dict:
        return {"cfg": self.cfg, "token_grid": self.token_grid, "track_conv_maps": self.track_conv_maps}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["cfg"])
        self.token_grid = state.get("token_grid")
        self.track_conv_maps = state.get("track_conv_maps", False)


class BitsCompressor:
    """What the layers that DivisionConfig.layer_bits gives Q HFC bits call: the model's compressor
    (its sharing cache, seed and plane numbering, so records stay distinct and shared as before),
    with Q in place of hfc_bits and activation_bits. Holds no state of its own."""

    def __init__(self, root: Compressor, bits: int) -> None:
        self.root = root
        self.cfg = root.cfg.replace(hfc_bits=bits, activation_bits=bits)

    @property
    def kernels(self) -> bool:
        return self.root.kernels

    @property
    def token_grid(self) -> TokenGrids | None:
        return self.root.token_grid

    def compress(self, x: torch.Tensor, mode: str | None = None, bits: int | None = None) -> CompressedActivation:
        return self.root.compress(x, mode, self.cfg.hfc_bits if bits is None else bits)

    def record_mode(self, x: torch.Tensor, mode: str, bits: int) -> str:
        return self.root.record_mode(x, mode, bits)

    def mark_conv_map(self, y: torch.Tensor) -> torch.Tensor:
        return self.root.mark_conv_map(y)

    def is_conv_map(self, x: torch.Tensor) -> bool:
        return self.root.is_conv_map(x)
