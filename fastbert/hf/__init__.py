"""Put fastbert's fused layers into a transformers BERT-family model, in place, without touching its weights.

Supported: BERT, RoBERTa, XLM-RoBERTa, CamemBERT and ELECTRA (their encoders share BERT's layer structure in
transformers), each as the bare ``*Model`` or a ``*For*`` head around one. Three ways, each changing more:

* ``attn_implementation="fastbert"`` — after :func:`register_attention` (transformers >= 5, which has
  attention and mask registries), ``from_pretrained(path, attn_implementation="fastbert")`` runs only the
  attention core, softmax(q kᵀ) v, through :func:`fastbert.ops.attention`, fed a (batch, seq) key-padding
  mask. Everything else stays transformers' and the batch stays padded.
* :func:`patch_hf` — swaps the encoder and, in every layer, the self-attention, self-output, intermediate
  and output modules for fastbert's (one fused q/k/v GEMM + fused attention, dropout+residual+LayerNorm,
  bias+GELU). The new modules hold the very same ``nn.Linear``/``nn.LayerNorm`` children, so parameter
  names, tensors and the state_dict do not change.
* :func:`patch_hf_classes` — every supported model built afterwards is patched as by :func:`patch_hf`.

Why modules and not hooks or instance-bound ``forward`` functions: whatever reaches the fused encoder
arrives as an argument of its ``forward`` — transformers' own mask (2-D, the 4-D additive float mask of
eager, the 4-D bool mask of sdpa, or None), turned back into a key-padding mask there. Module hooks do not
run for ``model.forward(...)`` (sentence-transformers calls it) and per-model state carried between hooks
races between threads and ``nn.DataParallel`` replicas; a ``forward`` bound on an instance is bypassed by
``type(model).forward(model, ...)`` and still points at the original after DataParallel replicates the
module. Replaced submodules and a class-level head wrapper hold no per-call state on the model (the fused MLM
loss's labels reach the decoder through a context variable of the calling thread) and are reached however
the model is called (``torch.compile``, DDP, DataParallel, threads, gradient checkpointing included).

Numbers: the encoder drops the padding (runs unpadded, varlen attention) only when that changes nothing
a caller reads — padding positions of ``last_hidden_state`` then hold zeros, while transformers computes
values there that no real token depends on. It runs padded, with transformers' numbers at every position,
when position 0 is padding (the pooler and the first-token classifiers read it), when hidden states are
requested, for question answering (its softmax spans the padding), and when per-token labels at padding
positions are not -100. The head wrappers installed on the head classes tell the encoder the last two.

Layout (one concern per module):

==========================  =======================================================================
``families.py``             the table: one :class:`~fastbert.hf.families.Family` per supported family
                            (classes, slot paths, child names), :data:`FAMILIES`, finding the bare model
``inputs.py``               transformers' masks back to a key-padding mask; refused call arguments
``fused.py``                the fused modules, built around a transformers module's own children
``encoder.py``              :class:`FusedBertEncoder`: one unpad before the layers, one pad after
``heads.py``                head-class ``forward`` wrappers that say per call whether padding is read
                            (and hand the labels to a fused MLM decoder)
``mlm_loss.py``             ``fused_mlm_loss=True``: the decoder that computes the MLM loss without logits
``patch.py``                :func:`patch_hf` (one walk-check-replace loop over the parts) and
                            :func:`is_patched`
``classes.py``              :func:`patch_hf_classes` / :func:`unpatch_hf_classes`
``attn_implementation.py``  ``attn_implementation="fastbert"``: :func:`register_attention`
==========================  =======================================================================

Adding a family whose encoder is BERT's (see :mod:`fastbert.hf.families` for exactly what that covers)
is one :class:`~fastbert.hf.families.Family` entry in :data:`FAMILIES` — its modeling module, class
prefix and base-model attribute, plus other child names or slot paths where its modules differ — and a
test beside the others in ``tests/test_patch_hf_clients.py``.

Nothing here imports transformers until one of these functions is called.
"""
from fastbert.hf.attn_implementation import (
    ATTENTION_NAME,
    fastbert_attention_forward,
    fastbert_padding_mask,
    register_attention,
)
from fastbert.hf.classes import patch_hf_classes, unpatch_hf_classes
from fastbert.hf.encoder import EncoderLayout, FusedBertEncoder
from fastbert.hf.families import FAMILIES, AddNormChildren, AttentionChildren, Family, IntermediateChildren, Slot
from fastbert.hf.fused import FusedBertIntermediate, FusedBertOutput, FusedBertSelfAttention, FusedBertSelfOutput
from fastbert.hf.inputs import key_padding_mask
from fastbert.hf.mlm_loss import FusedMlmDecoder
from fastbert.hf.patch import is_patched, patch_hf

__all__ = [
    "ATTENTION_NAME",
    "FAMILIES",
    "AddNormChildren",
    "AttentionChildren",
    "EncoderLayout",
    "Family",
    "FusedBertEncoder",
    "FusedBertIntermediate",
    "FusedBertOutput",
    "FusedBertSelfAttention",
    "FusedBertSelfOutput",
    "FusedMlmDecoder",
    "IntermediateChildren",
    "Slot",
    "fastbert_attention_forward",
    "fastbert_padding_mask",
    "is_patched",
    "key_padding_mask",
    "patch_hf",
    "patch_hf_classes",
    "register_attention",
    "unpatch_hf_classes",
]
