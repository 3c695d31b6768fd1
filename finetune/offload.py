"""Activation offloading: decoder layers that keep their activations in CPU memory instead of recomputing them.

A checkpointed layer runs its forward twice; an offloaded one runs it once. Each activation its backward needs is
copied to pinned CPU memory on a side stream as the forward makes it, and copied back on that stream one offloaded
layer ahead of the backward that needs it, so both copies run beside the compute. Spread among the checkpointed
layers, each offloaded layer's copy has the time of the layers around it. As torchtune's OffloadActivations and
Unsloth's offloaded checkpointing, through autograd's saved-tensor hooks.

PCIe bounds it: 46.5 GB/s each way with both directions busy (PCIe 5.0 x16, an H100), against about 280 MB (by
count) that a StarCoder-15B layer saves at 2,048 tokens. So it saves memory, not time: with every layer of `lean`
at 1 x 2,048 offloaded, 0.9 GiB less and 1.9% slower than with every layer checkpointed (H100, 2026-12-07, `python
bench/recipes.py --size 15b --steps 4 --warmup 2 --recipes lean_all@11.5,lean_off40@11.5`, `lean_all` then at
1 x 2,048, now `lean_b1_all`; docs/PERFORMANCE.md). No recipe uses it.

Checkpointed layers can keep their inputs there too (`--offload_layer_inputs`): the hidden states each one recomputes
from, all that a checkpointed layer holds on the GPU between its forward and its backward (2 bytes x hidden a token:
0.94 GiB for StarCoder-15B's 40 layers at 1 x 2,048). The checkpoint saves them through autograd's saved-tensor
hooks, so the same copies apply, one input per layer each way, small beside the layer's two forwards. As Unsloth's
offloaded gradient checkpointing: it lets a 16 GB recipe train at a larger batch, whose step no longer waits on the
host. The lean recipes use it: within 11.5 GiB, at 2 x 2,048 with every layer checkpointed, `lean_fp8` trained at
8,090 tokens/s in 10.1 GiB against 6,937 in 10.4 at 1 x 2,048 without it, and `lean` at 5,490 against 5,046 (H100,
2026-12-07, docs/PERFORMANCE.md). The inputs are hidden states, never weights, so they are offloaded under FSDP too,
where whole layers are not (their gathered weights would go with them).

Each GPU storage is copied once per layer however many saved tensors view it (FlashAttention's q, k and v; a LoRA
layer's input that the attention saved as its output), and each tensor comes back as the same view of its storage.
Weights and small tensors (norm statistics, sequence offsets, RNG state) are saved as they are.
"""

import torch

MIN_BYTES = 1 << 20  # below this a copy's fixed cost outweighs the memory it frees


def spread(checkpointed: int, offloaded: int) -> list[int]:
    """Which of the first `checkpointed` layers to offload instead: `offloaded` of them (at most all), evenly spaced,
    so that checkpointed layers sit between the copies."""
    count = min(offloaded, checkpointed)
    return [(2 * i + 1) * checkpointed // (2 * count) for i in range(count)]


def plan(checkpointed: int, offloaded: int) -> list[int]:
    """spread() on a GPU; none on the CPU, where the activations are in CPU memory already: the layers stay
    checkpointed."""
    return spread(checkpointed, offloaded) if torch.cuda.is_available() else []


class _Layer:
    """One offloaded layer's saved activations in one step."""

    def __init__(self):
        self.host: dict[int, torch.Tensor] = {}  # GPU storage address -> its bytes in CPU memory
        self.sources: list[torch.Tensor] = []  # those storages, held while the forward runs: an address stays theirs
        self.device: dict[int, torch.Tensor] | None = None  # the bytes back on the GPU, once fetched
        self.ready = None  # CUDA event: the fetch has landed
        self.unread = 0  # saved tensors the backward has not read yet


class Offloader:
    """The saved-tensor hooks and their state; see use()."""

    def __init__(self, model, layers: list[torch.nn.Module]):
        self.model = model
        self.index = {layer: i for i, layer in enumerate(layers)}
        self.weights: set[int] | None = None  # storage addresses of the model's parameters and buffers
        self.stream = None
        self.layers: dict[int, _Layer] = {}
        self.current: int | None = None  # the offloaded layer whose forward runs
        self.reading: int | None = None  # the offloaded layer whose backward runs
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def enter(self, module, args):
        if self.weights is None:  # once the model is where it trains
            self.weights = {t.untyped_storage().data_ptr() for t in (*self.model.parameters(), *self.model.buffers())}
        self.current = self.index[module]
        self.layers[self.current] = _Layer()
        self.reading = None
        self.hooks.__enter__()

    def exit(self, module, args, output):
        self.hooks.__exit__(None, None, None)
        self.layers[self.current].sources.clear()  # a copy still running holds its source (record_stream)
        self.current = None

    def copy_stream(self, device: torch.device):
        """The side stream the copies run on; None on the CPU, where torch.cuda.stream(None) does nothing."""
        if device.type == "cuda" and self.stream is None:
            self.stream = torch.cuda.Stream(device)
        return self.stream if device.type == "cuda" else None

    @torch.no_grad()
    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if self.current is None or key in self.weights or storage.nbytes() < MIN_BYTES:
            return tensor
        layer = self.layers[self.current]
        if key not in layer.host:
            source = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
            stream = self.copy_stream(tensor.device)
            if stream is not None:  # the copy reads what the compute stream has written so far
                stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(stream):
                layer.host[key] = torch.empty(source.shape, dtype=torch.uint8, pin_memory=stream is not None)
                layer.host[key].copy_(source, non_blocking=True)
            if stream is not None:  # the allocator keeps the storage until the copy is done
                source.record_stream(stream)
            layer.sources.append(source)
        layer.unread += 1
        return self.current, key, tensor.device, tensor.dtype, tensor.shape, tensor.stride(), tensor.storage_offset()

    @torch.no_grad()
    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        index, key, device, dtype, shape, stride, offset = packed
        layer = self.layers[index]
        if self.reading != index:  # this layer's backward begins: fetch its activations, and the next layer's
            self.reading = index
            self.fetch(layer, device)
            earlier = [i for i in self.layers if i < index]
            if earlier:
                self.fetch(self.layers[max(earlier)], device)
            if layer.ready is not None:
                torch.cuda.current_stream(device).wait_event(layer.ready)
        tensor = layer.device[key].view(dtype).as_strided(shape, stride, offset)
        layer.unread -= 1
        if not layer.unread:  # the backward holds what it still needs; this step is done with the rest
            del self.layers[index]
        return tensor

    def fetch(self, layer: _Layer, device: torch.device):
        if layer.device is not None:
            return
        stream = self.copy_stream(device)
        with torch.cuda.stream(stream):
            layer.device = {key: host.to(device, non_blocking=True) for key, host in layer.host.items()}
            if stream is not None:
                layer.ready = torch.cuda.Event()
                layer.ready.record(stream)
        if stream is not None:  # read on the compute stream: not reused before it is done there
            for tensor in layer.device.values():
                tensor.record_stream(torch.cuda.current_stream(device))


def _saving_inputs_through(offloader: Offloader, layer, checkpoint):
    """A layer's checkpoint function (transformers' `_gradient_checkpointing_func`) whose saved inputs go through the
    offloader's hooks; inside the layer the checkpoint's own hooks take over."""
    def offloading_checkpoint(function, *args, **kwargs):
        offloader.enter(layer, args)
        try:
            return checkpoint(function, *args, **kwargs)
        finally:
            offloader.exit(layer, args, None)

    return offloading_checkpoint


def use(model, layers: list[torch.nn.Module], input_layers: list[torch.nn.Module] = ()) -> Offloader:
    """`layers` (decoder layers of `model`) keep their activations in CPU memory instead of recomputing them, and
    `input_layers` (checkpointed ones) the inputs they recompute from."""
    chosen = {*layers, *input_layers}
    offloader = Offloader(model, [module for module in model.modules() if module in chosen])  # in the model's order
    for layer in layers:
        layer.gradient_checkpointing = False
        layer.offloads_activations = True
        layer.register_forward_pre_hook(offloader.enter)
        layer.register_forward_hook(offloader.exit, always_call=True)
    for layer in input_layers:
        layer.offloads_inputs = True
        checkpoint = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = _saving_inputs_through(offloader, layer, checkpoint)
    return offloader


def offloaded(layers: list[torch.nn.Module], inputs: bool = False) -> int:
    """How many of these decoder layers offload their activations (with `inputs`: their inputs)."""
    return sum(getattr(layer, "offloads_inputs" if inputs else "offloads_activations", False) for layer in layers)
