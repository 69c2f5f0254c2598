"""BERT with Hugging Face's module and parameter names, built on :mod:`fastbert.ops`.

A state_dict of any model here has exactly the keys transformers uses, so HF checkpoints load and
save unchanged. The layers call the fused ops (attention, dropout+residual+LayerNorm, bias+GELU);
which implementation runs is :mod:`fastbert.backend`'s choice. The task heads and their losses are in
:mod:`fastbert.heads`, the input checks in :mod:`fastbert._model_inputs`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastbert import ops, weights
from fastbert._model_inputs import check_model_inputs
from fastbert.activations import ACTIVATIONS
from fastbert.config import BertConfig
from fastbert.heads import (  # noqa: F401  (re-exported: HF's class names, importable from here as there)
    BertLMPredictionHead,
    BertOnlyMLMHead,
    BertPredictionHeadTransform,
    BertPreTrainingHeads,
    masked_lm,
    next_sentence_loss,
    sequence_classification_loss,
)
from fastbert.ops.flash_attention import varlen_preferred
from fastbert.ops.padding import check_cu_seqlens
from fastbert.outputs import (
    BaseModelOutputWithPooling,
    BertForPreTrainingOutput,
    MaskedLMOutput,
    SequenceClassifierOutput,
)


@dataclass
class AttentionInputs:
    """How the encoder's tokens are laid out: padded (key_padding_mask) or unpadded (cu_seqlens)."""

    key_padding_mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0

    @property
    def unpadded(self) -> bool:
        return self.cu_seqlens is not None


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)),
                             persistent=False)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        words = self.word_embeddings(input_ids)
        if position_ids is None:
            position_ids = self.position_ids[:, : input_ids.shape[1]]
        if token_type_ids is None:
            token_types = self.token_type_embeddings.weight[0]
        else:
            token_types = self.token_type_embeddings(token_type_ids)
        position_and_type = (self.position_embeddings(position_ids) + token_types).expand_as(words)
        # HF order: LayerNorm over the sum, then dropout (not the sublayers' dropout-before-add).
        hidden = ops.dropout_add_layer_norm(words, position_and_type, self.LayerNorm.weight, self.LayerNorm.bias,
                                            self.LayerNorm.eps, 0.0)
        return self.dropout(hidden)


def project_qkv(hidden_states: torch.Tensor, query: nn.Linear, key: nn.Linear, value: nn.Linear, heads: int,
                head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as (..., heads, head_dim) from the three Linear modules (their names stay HF's). On a GPU one
    GEMM on their concatenated weights (one launch, not three); on the CPU three GEMMs, which run as fast
    as one there, where concatenating the weights on every call would cost a copy of them."""
    lead = hidden_states.shape[:-1]
    if not hidden_states.is_cuda:
        return tuple(F.linear(hidden_states, m.weight, m.bias).view(*lead, heads, head_dim)
                     for m in (query, key, value))
    weight = torch.cat((query.weight, key.weight, value.weight))
    bias = torch.cat((query.bias, key.bias, value.bias))
    return F.linear(hidden_states, weight, bias).view(*lead, 3, heads, head_dim).unbind(dim=-3)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(config.hidden_size, self.all_head_size)
        self.value = nn.Linear(config.hidden_size, self.all_head_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        lead = hidden_states.shape[:-1]
        q, k, v = project_qkv(hidden_states, self.query, self.key, self.value, self.num_attention_heads,
                              self.attention_head_size)
        dropout_p = self.dropout.p if self.training else 0.0
        if attn.unpadded:
            context = ops.attention_varlen(q, k, v, attn.cu_seqlens, attn.max_seqlen, dropout_p)
        else:
            context = ops.attention(q, k, v, attn.key_padding_mask, dropout_p)
        return context.reshape(*lead, self.all_head_size)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return ops.dropout_add_layer_norm(self.dense(hidden_states), input_tensor, self.LayerNorm.weight,
                                          self.LayerNorm.bias, self.LayerNorm.eps,
                                          self.dropout.p if self.training else 0.0)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        return self.output(self.self(hidden_states, attn), hidden_states)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.hidden_act = config.hidden_act
        self.intermediate_act_fn = ACTIVATIONS[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.hidden_act == "gelu":
            return ops.dense_gelu(hidden_states, self.dense.weight, self.dense.bias)
        return self.intermediate_act_fn(self.dense(hidden_states))


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return ops.dropout_add_layer_norm(self.dense(hidden_states), input_tensor, self.LayerNorm.weight,
                                          self.LayerNorm.bias, self.LayerNorm.eps,
                                          self.dropout.p if self.training else 0.0)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        attention_output = self.attention(hidden_states, attn)
        return self.output(self.intermediate(attention_output), attention_output)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        for layer in self.layer:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden_states = checkpoint(layer, hidden_states, attn, use_reentrant=False)
            else:
                hidden_states = layer(hidden_states, attn)
        return hidden_states


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.pool(hidden_states[:, 0])

    def pool(self, first_tokens: torch.Tensor) -> torch.Tensor:
        """dense + tanh of each sequence's first ([CLS]) hidden state, (num_sequences, hidden)."""
        return self.activation(self.dense(first_tokens))


# ---------------------------------------------------------------------------------------------------
# Top-level models
# ---------------------------------------------------------------------------------------------------
class BertPreTrainedModel(nn.Module):
    """Init scheme, tying and HF-format load/save shared by every top-level model."""

    base_model_prefix = "bert"

    def __init__(self, config: BertConfig):
        super().__init__()
        if not isinstance(config, BertConfig):
            raise TypeError(f"config must be a fastbert.BertConfig, got {type(config).__name__}")
        self.config = config

    def post_init(self) -> None:
        self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, BertLMPredictionHead):
            nn.init.zeros_(module.bias)

    def tie_weights(self) -> None:
        """Share the MLM decoder weight with the word embeddings (BERT ties them)."""
        head = self._lm_head()
        if head is not None and self.config.tie_word_embeddings:
            head.decoder.weight = self.bert.embeddings.word_embeddings.weight
        if head is not None:
            head.decoder.bias = head.bias

    def _lm_head(self) -> BertLMPredictionHead | None:
        cls = getattr(self, "cls", None)
        return getattr(cls, "predictions", None)

    def _tied_keys_now(self) -> tuple[str, ...]:
        """Parameters shared with another one: left out of saved files and never reported missing."""
        head = self._lm_head()
        if head is None:
            return ()
        keys = ["cls.predictions.decoder.bias"]
        if head.decoder.weight is self.bert.embeddings.word_embeddings.weight:
            keys.append("cls.predictions.decoder.weight")
        return tuple(keys)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of parameters, tied ones counted once; a method with transformers' arguments.

        ``only_trainable``: those with ``requires_grad``. ``exclude_embeddings``: without the
        ``nn.Embedding`` weights (word, position, token type).
        """
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings \
            else set()
        return sum(p.numel() for p in self.parameters()
                   if id(p) not in embeddings and (p.requires_grad or not only_trainable))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, config: BertConfig | None = None,
                        strict: bool = False, dtype: torch.dtype | None = None,
                        output_loading_info: bool = False):
        """Load an HF checkpoint directory (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``).

        Keys may be ``bert.``-prefixed or not; ``LayerNorm.gamma/beta`` are renamed. Parameters the
        checkpoint lacks (e.g. pre-training heads when loading a BertModel checkpoint) keep their
        initial values and are logged as a warning; ``strict=True`` makes any missing or unexpected key
        a ValueError that lists them. ``output_loading_info=True`` returns ``(model, LoadingInfo)``.
        """
        model, info = weights.load_pretrained(cls, directory, config=config, strict=strict, dtype=dtype)
        return (model, info) if output_loading_info else model

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` that transformers loads with no missing keys."""
        return weights.save_pretrained(self, directory)


class BertModel(BertPreTrainedModel):
    """The encoder: embeddings → N × BertLayer → (optional) pooler.

    ``unpad``: None (default) unpads the batch once after the embeddings and pads once at the end where
    that is faster (:func:`fastbert.ops.flash_attention.varlen_preferred`: where the fused varlen kernel
    runs, and on the CPU for a batch with enough padding); True/False force the unpadded/padded path.
    """

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.unpad: bool | None = None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def check_inputs(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None) -> None:
        """Raise a clear error for inputs that would give wrong numbers or a deep trace later."""
        check_model_inputs(self.config, input_ids, attention_mask, token_type_ids, position_ids)

    def _use_unpadded(self, attention_mask: torch.Tensor | None, hidden: torch.Tensor) -> bool:
        if attention_mask is None:
            return False
        if self.unpad is not None:
            return self.unpad
        return varlen_preferred(hidden, self.config.hidden_size // self.config.num_attention_heads, attention_mask)

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
               cu_seqlens=None, max_seqlen=None, indices=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(last_hidden_state (batch, seq_len, hidden), first_tokens (num_sequences, hidden))``.

        With ``cu_seqlens``/``max_seqlen``/``indices`` (the unpad metadata :class:`fastbert.data.MLMCollator`
        computes on the CPU) the encoder runs unpadded on exactly those sequences: no device sync, and
        packed rows (several sequences per row, ``position_ids`` restarting per sequence) attend only
        within each sequence. ``first_tokens`` are then each sequence's [CLS]; otherwise row position 0.
        Padding positions of the hidden state are zeros on the unpadded path.
        """
        self.check_inputs(input_ids, attention_mask, token_type_ids, position_ids)
        hidden = self.embeddings(input_ids, token_type_ids, position_ids)
        batch, seqlen = input_ids.shape
        if cu_seqlens is not None:
            if indices is None or max_seqlen is None:
                raise ValueError("cu_seqlens needs indices and max_seqlen too (the collator returns all three)")
            tokens = ops.gather_tokens(hidden, indices)  # checks the indices
            # Each sequence's first token is its [CLS] (first_tokens below): none may be empty.
            check_cu_seqlens(cu_seqlens, max_seqlen, tokens.shape[0], tokens.device, tokens="indices", non_empty=True)
            tokens = self.encoder(tokens, AttentionInputs(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen))
            return ops.pad_input(tokens, indices, batch, seqlen), tokens[cu_seqlens[:-1].long()]
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask != 0
        if self._use_unpadded(attention_mask, hidden):
            hidden, indices, cu_seqlens, max_seqlen = ops.unpad_input(hidden, attention_mask)
            hidden = self.encoder(hidden, AttentionInputs(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen))
            sequence_output = ops.pad_input(hidden, indices, batch, seqlen)
        else:
            sequence_output = self.encoder(hidden, AttentionInputs(key_padding_mask=attention_mask))
        return sequence_output, sequence_output[:, 0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None, *,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                indices: torch.Tensor | None = None) -> BaseModelOutputWithPooling:
        """input_ids: (batch, seq_len) int64; attention_mask: 1 = real token, 0 = padding;
        token_type_ids: segment ids (0 = A, 1 = B). Returns last_hidden_state, pooler_output.
        Optional unpad metadata (see :meth:`encode`): pooler_output is then one row per sequence."""
        sequence_output, first_tokens = self.encode(input_ids, attention_mask, token_type_ids, position_ids,
                                                    cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, indices=indices)
        pooled = self.pooler.pool(first_tokens) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=pooled)


class BertForPreTraining(BertPreTrainedModel):
    """BERT with the masked-LM and next-sentence heads (``bert``, ``cls``)."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, next_sentence_label: torch.Tensor | None = None, *,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                indices: torch.Tensor | None = None, masked_positions: torch.Tensor | None = None,
                return_logits: bool = False) -> BertForPreTrainingOutput:
        """labels: (batch, seq_len) original ids at masked positions, -100 elsewhere.
        next_sentence_label: (num_sequences,) 0 = B follows A, 1 = B is random — one per row, or one per
        packed sequence with the unpad metadata (see :meth:`BertModel.encode`). ``loss`` = mlm_loss +
        nsp_loss (whichever labels are given). With labels ``prediction_logits`` is None (the fused MLM
        loss holds no logits) unless ``return_logits=True``; ``mlm_num_correct`` / ``mlm_num_targets``
        count the masked targets. ``masked_positions``: see :func:`fastbert.heads.masked_lm`."""
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens=cu_seqlens,
                        max_seqlen=max_seqlen, indices=indices)
        sequence_output, pooled = out.last_hidden_state, out.pooler_output
        mlm = masked_lm(self.cls.predictions, sequence_output, labels, self.config.vocab_size, masked_positions,
                        return_logits)
        mlm_loss = mlm.loss
        seq_relationship_logits = self.cls.seq_relationship(pooled)
        nsp_loss = None
        if next_sentence_label is not None:
            nsp_loss = next_sentence_loss(seq_relationship_logits, next_sentence_label)
        losses = [x for x in (mlm_loss, nsp_loss) if x is not None]
        return BertForPreTrainingOutput(
            loss=sum(losses) if losses else None,
            prediction_logits=mlm.logits,
            seq_relationship_logits=seq_relationship_logits,
            mlm_loss=mlm_loss,
            nsp_loss=nsp_loss,
            mlm_num_correct=mlm.num_correct,
            mlm_num_targets=mlm.num_targets,
        )


class BertForMaskedLM(BertPreTrainedModel):
    """BERT with the masked-LM head only (``bert`` without pooler, ``cls.predictions``)."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None, indices: torch.Tensor | None = None,
                masked_positions: torch.Tensor | None = None, return_logits: bool = False) -> MaskedLMOutput:
        """As :meth:`BertForPreTraining.forward`: with labels ``logits`` is None unless ``return_logits``."""
        sequence_output = self.bert(input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens=cu_seqlens,
                                    max_seqlen=max_seqlen, indices=indices).last_hidden_state
        mlm = masked_lm(self.cls.predictions, sequence_output, labels, self.config.vocab_size, masked_positions,
                        return_logits)
        return MaskedLMOutput(loss=mlm.loss, logits=mlm.logits, num_correct=mlm.num_correct,
                              num_targets=mlm.num_targets)


class BertForSequenceClassification(BertPreTrainedModel):
    """BERT + dropout + a linear classifier on the pooled [CLS] (``bert``, ``dropout``, ``classifier``).

    Loss as transformers: num_labels == 1 → MSE regression; integer labels → cross-entropy;
    float (batch, num_labels) labels → multi-label BCE. ``config.problem_type`` overrides the guess."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        pooled = self.bert(input_ids, attention_mask, token_type_ids, position_ids).pooler_output
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = sequence_classification_loss(logits, labels, self.config.problem_type)
        return SequenceClassifierOutput(loss=loss, logits=logits)
