"""LoRA on megatron-core's tensor-parallel linears, with adapters that are Hugging Face PEFT's.

`apply_lora(model_chunks, peft)` (before megatron's DDP wrap) freezes every base parameter and gives
each targeted megatron linear a `lora` child holding one `LoraAdapter` (lora_A [rank, in],
lora_B [out, rank], dropout) per Hugging Face module the megatron module stands for:

    linear_qkv   -> q_proj, k_proj, v_proj   column-parallel, rows fused per query group
    linear_proj  -> o_proj                   row-parallel
    linear_fc1   -> gate_proj, up_proj       column-parallel, rows fused gate | up (per TP rank)
    linear_fc2   -> down_proj                row-parallel
    output_layer -> lm_head                  column-parallel, vocabulary padded

The output is base(x) + alpha / rank * B(A(dropout(x))) for every piece, PEFT's LoRA exactly.

**Why one adapter per Hugging Face module, not one per fused megatron module.** PEFT gives q, k, v
(and gate, up) each their own A and B. One adapter on the fused module shares A between q, k and v:
that model exports to PEFT (A copied three times) but is a different, smaller parameterisation, and a
PEFT adapter does not import into it. With separate adapters the parameters here *are* PEFT's, tensor
for tensor: each piece's B keeps Hugging Face's row order (a TP rank holds the contiguous q/k/v rows
of its query groups, its slice of gate and of up), so export is a renaming and training here trains
the model PEFT describes. Only inside the forward are the pieces fused: their B's become one block
matrix in megatron's fused row order (`state_dict_adapter.qkv_grouped`, the function that lays out
the base weights), so the fused output gets one matmul and one add.

**Tensor and sequence parallelism** (the sharding Megatron-Bridge uses; megatron-core 0.16 has no
LoRA, and PEFT's own megatron integration puts one adapter on the fused module, forces fp32 adapters
and does not gather the sequence for a column-parallel adapter under sequence parallelism):
* column-parallel base (output rows sharded): A is replicated, B is sharded on its output rows
  like the base weight. Without SP the adapter sees the whole sequence and the rank-sized A(x) is
  all-reduced in backward, so A's gradient and the adapter path's input gradient are complete on
  every rank. Under SP, A runs on this rank's positions and only A(x) (rank-sized) is gathered
  over the sequence: the adapter keeps no gathered sequence x hidden input (the base keeps its own
  input sharded, too). Backward reduce-scatters dL/dA(x); A's gradient covers this rank's positions
  and megatron's finalize sums it over TP (A is marked `sequence_parallel`, like the norm weights).
* row-parallel base (input columns sharded): A is sharded on its input columns, B is replicated.
  A(x) is all-reduced (as the base reduces its output); under SP the adapter's output is scattered
  over the sequence, as the base reduce-scatters its own.
Replicated adapter tensors therefore get identical, complete gradients on every TP rank (under SP
after that sum): megatron's DDP reduces them over data parallelism. Adapters follow the
pipeline stage of their layer. Dropout on a replicated input uses the default generator (equal
across TP ranks, as megatron's own dropout on replicated activations); on a TP- or SP-sharded input
it uses megatron's model-parallel RNG fork.

**Checkpoints.** The base keeps its parameters, names and dist-checkpoint keys (the layer's class
is swapped for a subclass that adds the adapters, instead of wrapping it): a base checkpoint loads
as before, and megatron code reaching into `output_layer.weight` still works. Adapter tensors have
their own global keys (lora_tensors.py); `adapter_sharded_state_dict` gives them alone,
`base_sharded_state_dict` everything else.

Only megatron's own ColumnParallelLinear / RowParallelLinear are adapted (backends `native` and
`local`); Transformer Engine's fused norm+linear modules are refused.
"""

from __future__ import annotations

import contextlib
import math
import zlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import (set_defaults_if_not_set_tensor_model_parallel_attributes,
                                                  set_tensor_model_parallel_attributes)
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    gather_from_sequence_parallel_region,
                                                    gather_from_tensor_model_parallel_region,
                                                    reduce_from_tensor_model_parallel_region,
                                                    scatter_to_sequence_parallel_region,
                                                    scatter_to_tensor_model_parallel_region)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from melama_mcore.errors import ConfigError
from melama_mcore.models.llama.lora_tensors import (COLUMN_PARALLEL, LAYER_PREFIX, PIECES, TARGETS, check_lora_settings,
                                                    fused_lora_B, is_adapter_key, lora_scaling, target_order)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
class LoraAdapter(torch.nn.Module):
    """One Hugging Face module's LoRA, this rank's shard: lora_A [rank, in], lora_B [out, rank]
    (PEFT's names and layout), and the dropout applied to its input."""

    def __init__(self, lora_A: torch.Tensor, out_features: int, dropout: float):
        super().__init__()
        self.lora_A = torch.nn.Parameter(lora_A)
        self.lora_B = torch.nn.Parameter(lora_A.new_zeros(out_features, lora_A.shape[0]))
        self.dropout = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A(dropout(x)). Called as a module, so that megatron DDP's forward pre-hook finishes the
        overlapped all-gather of this module's A and B (the distributed optimizer's updated shards)
        before either is used: B is read directly by the fused up-projection."""
        return F.linear(self.dropout(x), self.lora_A)


class _LoraLinear:
    """What the column- and row-parallel LoRA layers share (a mixin before the megatron class)."""

    lora: torch.nn.ModuleDict
    lora_target: str
    lora_scaling: float
    lora_dropout: float
    lora_groups: int  # query groups on this rank (linear_qkv)

    def _lora_down(self, x: torch.Tensor) -> torch.Tensor:
        """cat(A_i dropout_i(x)) over the pieces: [..., rank * pieces]."""
        return torch.cat([adapter(x) for adapter in self.lora.values()], dim=-1)

    def _lora_up(self, u: torch.Tensor) -> torch.Tensor:
        lora_B = fused_lora_B(self.lora_target, [a.lora_B for a in self.lora.values()], self.lora_groups)
        return F.linear(u, lora_B) * self.lora_scaling

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """megatron's entries for the base (its own keys), then the adapters sharded like the base:
        megatron's version would mark the adapters replicated; their entries are replaced."""
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        axis = {"lora_B": 0} if isinstance(self, ColumnParallelLinear) else {"lora_A": 1}
        for piece, adapter in self.lora.items():
            entries = make_sharded_tensors_for_checkpoint(
                adapter.state_dict(prefix="", keep_vars=True), f"{prefix}lora.{piece}.", axis, sharded_offsets,
                tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
            if piece == "lm_head":  # padded to a multiple of TP, like the output layer: loads at another TP
                entries[f"{prefix}lora.{piece}.lora_B"].allow_shape_mismatch = True
            sharded.update(entries)
        return sharded


class LoraColumnParallelLinear(_LoraLinear, ColumnParallelLinear):
    """ColumnParallelLinear + LoRA: A replicated, B sharded on the output rows like the weight."""

    def forward(self, input_, weight=None, runtime_gather_output=None):
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        output, bias = super().forward(input_, weight, runtime_gather_output=False)
        if self.sequence_parallel:
            # A on this rank's part of the sequence, then the rank-sized A(x) gathered, not the input:
            # the adapter keeps no sequence x hidden activation of its own. Backward reduce-scatters
            # dL/du (each rank's B shard gives part of it); A's gradient is then this rank's positions'
            # share, summed over TP by megatron's finalize (lora_A.sequence_parallel, as for the norms).
            # Positions differ per rank: dropout draws from megatron's model-parallel RNG.
            with tensor_parallel.get_cuda_rng_tracker().fork() if self.training and self.lora_dropout \
                    else contextlib.nullcontext():
                u = self._lora_down(input_)
            u = gather_from_sequence_parallel_region(u, tensor_parallel_output_grad=True, group=self.tp_group)
        else:
            # Each rank's B shard gives part of dL/du: summed over TP in backward, before A and x see it.
            u = copy_to_tensor_model_parallel_region(self._lora_down(input_), group=self.tp_group)
        output = output + self._lora_up(u)
        if gather:
            output = gather_from_tensor_model_parallel_region(output, group=self.tp_group)
        return output, bias


class LoraRowParallelLinear(_LoraLinear, RowParallelLinear):
    """RowParallelLinear + LoRA: A sharded on the input columns like the weight, B replicated."""

    def forward(self, input_):
        output, bias = super().forward(input_)
        x = input_ if self.input_is_parallel else scatter_to_tensor_model_parallel_region(input_, group=self.tp_group)
        dropping = self.training and self.lora_dropout
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropping else contextlib.nullcontext():
            # x is this rank's slice of the features: its own dropout mask
            u = reduce_from_tensor_model_parallel_region(self._lora_down(x), group=self.tp_group)
        delta = self._lora_up(u)
        if self.sequence_parallel:  # the base reduce-scatters over the sequence; the adapter's output is whole
            delta = scatter_to_sequence_parallel_region(delta, group=self.tp_group)
        return output + delta, bias


# ---------------------------------------------------------------------------------------------
# apply_lora
# ---------------------------------------------------------------------------------------------
def _init_lora_A(key: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """PEFT's (and nn.Linear's) initialisation of A, of the global tensor, from a generator seeded
    by the tensor's global identity: the same adapter whatever the TP/PP layout and build order."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    weight = torch.empty(shape)
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    return weight


def _add_adapters(module, target: str, layer: int | None, peft, seed: int) -> None:
    column = target in COLUMN_PARALLEL
    expected = ColumnParallelLinear if column else RowParallelLinear
    if type(module) is not expected:
        raise ConfigError(f"peft.method=lora adapts megatron's {expected.__name__} (model.backend native or "
                          f"local); {target} is a {type(module).__name__}")
    tp, tp_rank = module.tp_group.size(), module.tp_group.rank()
    config = module.config
    groups = config.num_query_groups // tp
    if column:  # global (out, in): the pieces split the module's output rows
        per_rank = {"linear_qkv": [groups * config.num_attention_heads // config.num_query_groups * config.kv_channels,
                                   groups * config.kv_channels, groups * config.kv_channels],
                    "linear_fc1": [module.output_size_per_partition // 2] * 2,
                    "output_layer": [module.output_size_per_partition]}[target]
    in_global = module.input_size
    adapters = {}
    for piece, out_local in zip(PIECES[target], per_rank if column else [module.output_size]):
        name = f"layer{layer}.{piece}" if layer is not None else piece
        lora_A = _init_lora_A(name, (peft.rank, in_global), seed)
        if not column:  # this rank's input columns
            width = in_global // tp
            lora_A = lora_A[:, tp_rank * width:(tp_rank + 1) * width]
        adapter = LoraAdapter(lora_A.to(device=module.weight.device, dtype=config.params_dtype).contiguous(),
                              out_local, peft.dropout)
        sharded, replicated = ("lora_B", "lora_A") if column else ("lora_A", "lora_B")
        set_tensor_model_parallel_attributes(getattr(adapter, sharded), True, 0 if column else 1, 1)
        set_defaults_if_not_set_tensor_model_parallel_attributes(getattr(adapter, replicated))
        for param in adapter.parameters():
            param.allreduce = True  # reduced over data parallelism, like every non-expert weight
        if column and config.sequence_parallel:  # A sees this rank's positions only: grads summed over TP
            adapter.lora_A.sequence_parallel = True
        adapters[piece] = adapter
    module.__class__ = LoraColumnParallelLinear if column else LoraRowParallelLinear
    module.lora = torch.nn.ModuleDict(adapters)
    module.lora_target, module.lora_scaling, module.lora_dropout = target, lora_scaling(peft), peft.dropout
    module.lora_groups = groups


def apply_lora(model_chunks: list, peft, seed: int = 0) -> None:
    """Freeze every parameter of these (unwrapped) GPTModel chunks and add LoRA adapters to the
    targeted layers, in place. Call before megatron's DDP wrap, so that DDP allocates gradient
    buffers and the optimizer holds state for the adapters only. A starts as PEFT starts it
    (Kaiming-uniform, drawn for the global tensor from `seed` and the tensor's identity), B at zero,
    so the model starts as the base; both in the model's params dtype."""
    check_lora_settings(peft)
    for chunk in model_chunks:
        if not hasattr(chunk, "decoder"):
            raise TypeError(f"apply_lora needs unwrapped GPTModel chunks (before DDP), got {type(chunk).__name__}")
        if any(isinstance(m, _LoraLinear) for m in chunk.modules()):
            raise ValueError("apply_lora: this model already has LoRA adapters")
        for param in chunk.parameters():
            param.requires_grad_(False)
        for target in target_order(peft):
            if target == "output_layer":
                if chunk.post_process:
                    _add_adapters(chunk.output_layer, target, None, peft, seed)
                continue
            path = TARGETS[target].removeprefix(LAYER_PREFIX)
            for layer in chunk.decoder.layers:
                _add_adapters(layer.get_submodule(path), target, layer.layer_number - 1, peft, seed)


# ---------------------------------------------------------------------------------------------
# Checkpoint state: adapters only, or the base only
# ---------------------------------------------------------------------------------------------
def adapter_sharded_state_dict(chunk, prefix: str = "", metadata: dict | None = None) -> dict:
    """The adapter tensors of one (unwrapped) model chunk as megatron ShardedTensors with global
    identity: an adapter-only dist-checkpoint. Load one with megatron's dist_checkpointing.load, then
    `chunk.load_state_dict(loaded, strict=False)` (the base's keys are the missing ones)."""
    return {k: v for k, v in chunk.sharded_state_dict(prefix=prefix, metadata=metadata).items() if is_adapter_key(k)}


def base_sharded_state_dict(chunk, prefix: str = "", metadata: dict | None = None) -> dict:
    """Everything but the adapters, under the keys of the model without LoRA: what loads a base
    checkpoint (`checkpoint.init_from`) into a model that already has adapters."""
    return {k: v for k, v in chunk.sharded_state_dict(prefix=prefix, metadata=metadata).items()
            if not is_adapter_key(k)}
