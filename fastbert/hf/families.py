"""The transformers families :func:`fastbert.patch_hf` knows, one table entry each.

A :class:`Family` says where the family's classes live, what they are called and, per fused piece of a
layer (a :class:`Slot`), where the module sits in the layer and what its children are called. The fused
modules adopt those children under the family's own names (so parameter names and the state_dict never
change) and read them back by role, which is why a family whose modules name their children differently
is a table entry with other :class:`AttentionChildren` / :class:`AddNormChildren` /
:class:`IntermediateChildren`, not new classes.

What an entry covers: BERT's encoder structure. ``<base>.encoder`` is ``<prefix>Encoder`` with BERT's
call, holding ``layer``, a list of layers whose four slots each compute one of BERT's pieces with BERT's
call signature — self-attention ``(hidden_states, attention_mask, ...) -> (context, weights)`` without
the output projection; ``LayerNorm(dropout(dense(x)) + residual)`` after the attention and after the MLP;
``act(dense(x))`` between them — and whose config has BERT's fields (``hidden_size``,
``num_attention_heads``, ``hidden_act``, ...). A family built differently needs fused modules of its own:
DistilBERT's ``TransformerBlock``, for one, keeps the output projection inside its attention
(``out_lin``), adds the residual and applies ``sa_layer_norm`` / ``output_layer_norm`` in the block
itself, has an ``ffn`` (``lin1``, ``lin2``) in place of intermediate/output and a ``transformer`` in place
of ``encoder``, so it would need a fused block and encoder, not only a table entry.
"""
from __future__ import annotations

import dataclasses
import sys

from torch import nn


@dataclasses.dataclass(frozen=True)
class AttentionChildren:
    """A self-attention module's q/k/v projections, its attention-probabilities dropout and the attribute
    holding its head count."""

    query: str = "query"
    key: str = "key"
    value: str = "value"
    dropout: str = "dropout"
    num_heads: str = "num_attention_heads"

    def modules(self) -> tuple[str, ...]:
        return (self.query, self.key, self.value, self.dropout)


@dataclasses.dataclass(frozen=True)
class AddNormChildren:
    """A ``LayerNorm(dropout(dense(x)) + residual)`` module's three children."""

    dense: str = "dense"
    layer_norm: str = "LayerNorm"
    dropout: str = "dropout"

    def modules(self) -> tuple[str, ...]:
        return (self.dense, self.layer_norm, self.dropout)


@dataclasses.dataclass(frozen=True)
class IntermediateChildren:
    """An ``act(dense(x))`` module's Linear and activation module."""

    dense: str = "dense"
    activation: str = "intermediate_act_fn"

    def modules(self) -> tuple[str, ...]:
        return (self.dense, self.activation)


@dataclasses.dataclass(frozen=True)
class Slot:
    """One module of every layer that a fused module replaces: its attribute path from the layer, the suffix
    of its transformers class name (after the family prefix), and its children's names."""

    path: str
    class_suffix: str
    children: AttentionChildren | AddNormChildren | IntermediateChildren

    def locate(self, layer: nn.Module) -> tuple[nn.Module | None, str, nn.Module | None]:
        """(owner, attribute, module) of this slot in ``layer``; None where the layer has no such path."""
        return locate_path(layer, self.path)


def locate_path(root: nn.Module, path: str) -> tuple[nn.Module | None, str, nn.Module | None]:
    """(owner, attribute, module) of the dotted attribute ``path`` below ``root``: the module that holds the
    last attribute, its name, and the submodule there (None where the path or the module is missing)."""
    owner = root
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent, None)
    module = getattr(owner, name, None) if owner is not None else None
    return owner, name, module if isinstance(module, nn.Module) else None


@dataclasses.dataclass(frozen=True)
class Family:
    """One transformers model family with BERT's encoder (see the module docstring for what that covers)."""

    name: str
    module: str     # transformers' modeling module
    prefix: str     # class-name prefix: <prefix>Model, <prefix>Encoder, <prefix>SelfAttention, ...
    base_attr: str  # the attribute by which the heads hold the bare model
    attention: Slot = Slot("attention.self", "SelfAttention", AttentionChildren())
    attention_output: Slot = Slot("attention.output", "SelfOutput", AddNormChildren())
    intermediate: Slot = Slot("intermediate", "Intermediate", IntermediateChildren())
    output: Slot = Slot("output", "Output", AddNormChildren())

    def modeling_module(self):
        if self.module not in sys.modules:
            try:
                __import__(self.module)
            except ImportError as err:
                raise ImportError("fastbert.hf needs transformers (pip install 'transformers>=5')") from err
        return sys.modules[self.module]

    def cls(self, suffix: str) -> type:
        return getattr(self.modeling_module(), self.prefix + suffix)

    def slot(self, name: str) -> Slot:
        return getattr(self, name)


FAMILIES = (
    Family("BERT", "transformers.models.bert.modeling_bert", "Bert", "bert"),
    Family("RoBERTa", "transformers.models.roberta.modeling_roberta", "Roberta", "roberta"),
    Family("XLM-RoBERTa", "transformers.models.xlm_roberta.modeling_xlm_roberta", "XLMRoberta", "roberta"),
    Family("CamemBERT", "transformers.models.camembert.modeling_camembert", "Camembert", "roberta"),
    Family("ELECTRA", "transformers.models.electra.modeling_electra", "Electra", "electra"),
)
SUPPORTED = "BERT, RoBERTa, XLM-RoBERTa, CamemBERT and ELECTRA"


def is_hf(module: nn.Module, cls: type) -> bool:
    """A transformers module of this kind, not a user subclass."""
    return isinstance(module, cls) and type(module).__module__ == cls.__module__


def family_of(model: nn.Module) -> Family | None:
    module = type(model).__module__
    return next((f for f in FAMILIES if f.module == module), None)


def require_transformers_5() -> None:
    """The fused encoder takes transformers 5's encoder call (masks built by masking_utils, ``**kwargs``
    passed down to the layers); transformers 4's differs, so patching it is refused up front."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        raise ImportError(f"fastbert.patch_hf needs transformers >= 5, found {transformers.__version__} "
                          "(pip install 'transformers>=5')")


def find_base(model: nn.Module) -> tuple[Family, nn.Module]:
    """(family, bare model) of a supported transformers model or head; TypeError naming what is supported."""
    family = family_of(model)
    if family is not None:
        base_cls = family.cls("Model")
        if is_hf(model, base_cls):
            return family, model
        base = getattr(model, family.base_attr, None)
        if isinstance(base, nn.Module) and is_hf(base, base_cls):
            return family, base
    for family in FAMILIES:  # a user's head around a transformers bare model
        if family.module in sys.modules:
            base = getattr(model, family.base_attr, None)
            if isinstance(base, nn.Module) and is_hf(base, family.cls("Model")):
                return family, base
    raise TypeError(
        f"fastbert.patch_hf supports transformers {SUPPORTED} models: the bare model (BertModel, RobertaModel, "
        "XLMRobertaModel, CamembertModel, ElectraModel) or a head around one (BertForMaskedLM, "
        f"RobertaForSequenceClassification, ElectraForPreTraining, ...); got {type(model).__name__}"
    )


def model_classes(family: Family) -> list[type]:
    """The family's bare model and every head class transformers defines for it."""
    module = family.modeling_module()
    pretrained = family.cls("PreTrainedModel")
    return [c for name, c in vars(module).items()
            if isinstance(c, type) and c.__module__ == module.__name__ and name.startswith(family.prefix)
            and issubclass(c, pretrained) and c is not pretrained]
