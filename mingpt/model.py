"""
The GPT language model: GPT-2's architecture, minGPT's API, and the options of the modern recipe
(modded-nanogpt, nanochat): rotary positions, RMSNorm, QK-norm, ReLU^2, no biases, zero-initialised
output layers, logit soft-capping, value embeddings, token shift; each off by default (see GPT.get_default_config).

References:
1) the official GPT-2 TensorFlow implementation released by OpenAI:
   https://github.com/openai/gpt-2/blob/master/src/model.py
2) huggingface/transformers PyTorch implementation, whose parameter names we keep so that
   checkpoints map one to one (only the Conv1D weights are stored transposed there):
   https://github.com/huggingface/transformers/blob/main/src/transformers/models/gpt2/modeling_gpt2.py

Shapes in comments: B batch, T time (tokens), C channels (n_embd), nh heads, hs head size (C // nh).
"""

import contextlib
import logging
import math

import torch
import torch.nn as nn
from torch.nn import functional as F

import mingpt.kernels as kernels
import mingpt.ops as ops
from mingpt.config import ARCH_OPTIONS, PRESETS, resolve_config  # noqa: F401 (mingpt.model.PRESETS stays importable)
from mingpt.generate import complete
from mingpt.errors import ConfigError
from mingpt.hardware import Linear
from mingpt.layers import ReLUSquared, TokenShift, apply_rotary, make_norm, rotary_angles
from mingpt.loss import linear_cross_entropy, worth_chunking
from mingpt.utils import CfgNode as CN

logger = logging.getLogger(__name__)

# -----------------------------------------------------------------------------

def _row_positions(start, T):
    """ start (B,), a position per row -> the indices (rows (B, 1), cols (B, T)) of row b's [start[b], start[b]+T) """
    return (torch.arange(start.size(0), device=start.device)[:, None],
            start[:, None] + torch.arange(T, device=start.device))


class KVCache(nn.Module):
    """
    Preallocated keys and values of one attention layer, (B, nh, max_len, hs) each. Writing the
    new step in place avoids the torch.cat per token (and the reallocation it implies) that a
    growing cache would pay, which is what makes batch-1 decoding weight-bandwidth bound.
    """

    def __init__(self, batch_size, max_len, n_head, head_size, dtype=torch.float32, device=None, keep_ids=False):
        super().__init__()
        shape = (batch_size, n_head, max_len, head_size)
        self.register_buffer('k', torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer('v', torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # keep_ids: the token id at each position too, (B, max_len) (a token_shift model's first layer)
        ids = torch.zeros(batch_size, max_len, dtype=torch.long, device=device) if keep_ids else None
        self.register_buffer('ids', ids, persistent=False)

    def record_ids(self, start, idx):
        """
        write idx (B, T) at positions [start, start+T) (start an int or a (B,) tensor, as in update);
        -> (B,) each row's id at start - 1, the token before this step's first, -1 where start is 0
        """
        B, T = idx.shape
        if torch.is_tensor(start):
            rows, cols = _row_positions(start, T)
            self.ids[rows, cols] = idx
            return torch.where(start > 0, self.ids[rows[:, 0], (start - 1).clamp(min=0)], -1)
        self.ids[:B, start:start + T] = idx
        return self.ids[:B, start - 1] if start > 0 else idx.new_full((B,), -1)

    def update(self, start, k, v):
        """
        write k, v (B, nh, T, hs) at positions [start, start+T); return everything up to there.
        start may also be a (B,) LongTensor, a position per row: row b's T keys go to [start[b],
        start[b]+T); the first B rows then come back whole, and the caller's mask hides what a row
        has not written
        """
        if torch.is_tensor(start):
            B = k.size(0)
            rows, cols = _row_positions(start, k.size(2))
            # indexed as [rows, :, cols] the cache reads (B, T, nh, hs): the heads move behind time
            self.k[rows, :, cols], self.v[rows, :, cols] = k.transpose(1, 2), v.transpose(1, 2)
            return self.k[:B], self.v[:B]
        end = start + k.size(2)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def rows(self, a, b):
        """ rows a..b-1 as a cache of their own, sharing this one's memory (some sequences of a batch prefilled alone) """
        view = KVCache(b - a, 0, self.k.size(1), self.k.size(3), self.k.dtype, self.k.device)
        view.k, view.v = self.k[a:b], self.v[a:b]
        view.ids = None if self.ids is None else self.ids[a:b]
        return view

    def move_row(self, src, dst, n):
        """ copy row src's first n positions into row dst (a sequence moving to another row) """
        for buf in (self.k, self.v):
            buf[dst, :, :n] = buf[src, :, :n]
        if self.ids is not None:
            self.ids[dst, :n] = self.ids[src, :n]


class CausalSelfAttention(nn.Module):
    """
    Multi-head masked self-attention with a projection at the end. The attention itself is
    torch's scaled_dot_product_attention (a fused kernel, and no (T, T) mask buffer to carry in
    the state dict: minGPT's persistent `attn.bias` mask is what broke its loading of newer
    transformers checkpoints).
    """

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # key, query, value projections for all heads, but in a batch
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # output projection
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.attn_pdrop = config.attn_pdrop
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.qk_norm = config.qk_norm
        if config.value_embeds:
            # the weights of the values and of the token's value embedding in their sum (learned)
            self.v_mix = nn.Parameter(torch.tensor([0.5, 0.5]))

    def forward(self, x, kv_cache=None, cache_pos=0, attn_mask=None, rotary=None, ve=None):
        B, T, C = x.size()
        # (B, T, 3C) -> three (B, nh, T, hs): heads become a batch dimension. One view + permute
        # rather than split + 3 views + 3 transposes: the same strided views in fewer ops, which
        # counts when decoding runs ~25 small ops per layer per token
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if ve is not None:
            # value embeddings: each token's values also carry an embedding of the token itself, (B, T, C)
            # split into heads as v is: what a position passes on need not be rebuilt from the residual
            v = self.v_mix[0] * v + self.v_mix[1] * ve.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.qk_norm:
            # each head's query and key to unit RMS: attention logits stay bounded, however large
            # the projections grow (no gain: the scale of the logits is the softmax's 1/sqrt(hs))
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if rotary is not None:
            # keys are cached rotated: a cached key keeps the position it was written at
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)

        if kv_cache is not None:
            # attend over everything cached so far plus this step: k, v become (B, nh, cache_pos+T, hs)
            k, v = kv_cache.update(cache_pos, k, v)
            if torch.is_tensor(cache_pos):  # a position per row: keys up to the furthest row's, as masked
                k, v = k[:, :, :attn_mask.size(-1)], v[:, :, :attn_mask.size(-1)]

        if attn_mask is None and cache_pos > 0 and T > 1:
            # queries sit at positions [cache_pos, cache_pos+T): causal against an offset diagonal,
            # which is_causal (top-left aligned) cannot express
            attn_mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=cache_pos)
        # a single new query (T == 1) may see every cached key, so it needs no mask at all
        is_causal = attn_mask is None and T > 1
        dropout_p = self.attn_pdrop if self.training else 0.0
        autocast = x.device.type == 'cpu' and torch.is_autocast_enabled('cpu')
        with torch.autocast('cpu', enabled=False) if autocast else contextlib.nullcontext():
            if autocast:
                # mixed precision on CPU: autocast's bf16 matmuls are fast (AVX512-BF16, AMX), but
                # attention is faster in fp32 on a CPU, forward and backward, so it stays in fp32
                q, k, v = q.float(), k.float(), v.float()
            if kv_cache is None and is_causal and dropout_p == 0.0 and ops.usable_attention(q, k, v):
                # training (and any pass without a cache) on a CPU: mingpt.ops' attention, faster
                # than torch's at the contexts a CPU trains on. Given q, k, v still as the projection's
                # views, it returns the projection's gradient whole, not as three pieces to assemble
                packed = not (autocast or self.qk_norm or rotary is not None or ve is not None)  # v is qkv's
                y = ops.attention_packed(qkv) if packed else ops.attention(q, k, v)
                y = y.view(B, T, C)  # written (B, T, nh, hs): heads side by side
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                   is_causal=is_causal)
                y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side

        # output projection
        y = self.resid_dropout(self.c_proj(y))
        return y


class NewGELU(nn.Module):
    """ GPT-2's GELU: the tanh approximation (Hendrycks & Gimpel), as in BERT and OpenAI's code (on a
    CPU in C: torch's kernel for it is slow, see mingpt.ops) """

    def forward(self, x):
        return ops.gelu(x)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = ReLUSquared() if config.mlp_act == 'relu2' else NewGELU()
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """ an unassuming Transformer block: pre-norm, attention then MLP, each residual """

    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    step_in_c = False  # set by pack('one'): one-token steps may run as one C call (mingpt.kernels.block_step)

    def pack(self, rows='many'):
        """
        Decoding one sequence (rows='one', hardware.pack_weights): a GPT-2 block (LayerNorms, tanh
        GELU, no QK-norm, no hooks) whose Linears keep mingpt.kernels' copy of their weights runs its
        one-token steps as one C call, the same ops without the ~25 torch calls between them.
        """
        gpt2 = (type(self.ln_1) is type(self.ln_2) is nn.LayerNorm and self.ln_1.eps == self.ln_2.eps
                and type(self.mlp.act) is NewGELU and not self.attn.qk_norm)
        hooked = any(m._forward_hooks or m._forward_pre_hooks for m in self.modules())
        self.step_in_c = rows == 'one' and gpt2 and not hooked and kernels.available()
        kernels.release(self)  # the C step's arguments point into the weight copies packing replaces

    def forward(self, x, kv_cache=None, cache_pos=0, attn_mask=None, rotary=None, ve=None):
        if (self.step_in_c and kv_cache is not None and rotary is None and ve is None and x.size(1) == 1
                and not self.training and isinstance(cache_pos, int) and kernels.usable_step(x, kv_cache, cache_pos)):
            y = kernels.block_step(self, x, kv_cache, cache_pos)
            if y is not None:
                return y
        x = x + self.attn(self.ln_1(x), kv_cache, cache_pos, attn_mask, rotary, ve)
        x = x + self.mlp(self.ln_2(x))
        return x

# -----------------------------------------------------------------------------

class GPT(nn.Module):
    """ GPT Language Model """

    @staticmethod
    def get_default_config():
        C = CN()
        # either model_type or (n_layer, n_head, n_embd) must be given in the config
        C.model_type = 'gpt'
        C.n_layer = None
        C.n_head = None
        C.n_embd = None
        # these options must be filled in externally
        C.vocab_size = None
        C.block_size = None
        # dropout hyperparameters
        C.embd_pdrop = 0.1
        C.resid_pdrop = 0.1
        C.attn_pdrop = 0.1
        # share the token embedding with lm_head, as GPT-2 checkpoints do (minGPT keeps them apart)
        C.tie_weights = False
        # the modern recipe's architecture (modded-nanogpt, nanochat); every default is GPT-2's.
        # Positions: 'learned' (GPT-2's wpe table) or 'rope' (rotary: queries and keys turned by
        # their position, no wpe; rope_base sets the slowest turn)
        C.pos_emb = ARCH_OPTIONS['pos_emb']
        C.rope_base = ARCH_OPTIONS['rope_base']
        # 'layernorm' or 'rmsnorm' (scale by the root mean square only: no mean, no bias)
        C.norm = ARCH_OPTIONS['norm']
        # True: RMS-normalise each head's queries and keys before attention
        C.qk_norm = ARCH_OPTIONS['qk_norm']
        # the MLP's activation: 'gelu' (GPT-2's tanh GELU) or 'relu2' (relu(x) squared)
        C.mlp_act = ARCH_OPTIONS['mlp_act']
        # False: no biases in the Linear layers and LayerNorms
        C.bias = ARCH_OPTIONS['bias']
        # True: lm_head and every block's output projections (attn.c_proj, mlp.c_proj) start at zero,
        # so each block starts as the identity and the first logits are uniform (needs tie_weights=False)
        C.zero_init_out = ARCH_OPTIONS['zero_init_out']
        # a number c: logits become c * tanh(logits / c), smoothly bounded in (-c, c); None: as they are
        C.logit_softcap = ARCH_OPTIONS['logit_softcap']
        # True: each attention layer has a token embedding table of its own, added to its values
        # (weighted, learned): nanochat's and modded-nanogpt's value embeddings
        C.value_embeds = ARCH_OPTIONS['value_embeds']
        # True: each position's token embedding plus a learned per-channel share of the previous token's
        # (RWKV's token shift, mingpt.layers.TokenShift)
        C.token_shift = ARCH_OPTIONS['token_shift']
        return C

    def __init__(self, config):
        super().__init__()
        config = resolve_config(config)
        self.config = config
        self.block_size = config.block_size
        self.rope = config.pos_emb == 'rope'

        self.transformer = nn.ModuleDict(dict(
            wte = nn.Embedding(config.vocab_size, config.n_embd),
            **({} if self.rope else dict(wpe = nn.Embedding(config.block_size, config.n_embd))),
            drop = nn.Dropout(config.embd_pdrop),
            h = nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f = make_norm(config, config.n_embd),
            # value embeddings: one table per layer, (vocab_size, C) each
            **(dict(ve = nn.ModuleList([nn.Embedding(config.vocab_size, config.n_embd)
                                        for _ in range(config.n_layer)])) if config.value_embeds else {}),
            **(dict(shift = TokenShift(config.n_embd)) if config.token_shift else {}),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)

        # init all weights, and apply a special scaled init to the residual projections, per GPT-2:
        # each of the 2 * n_layer residual branches adds variance, so shrink what they add
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02/math.sqrt(2 * config.n_layer))
            if config.zero_init_out and (pn.endswith('c_proj.weight') or pn == 'lm_head.weight'):
                torch.nn.init.zeros_(p)
        if getattr(config, 'tie_weights', False):
            self.lm_head.weight = self.transformer.wte.weight

        # report number of parameters (note we don't count the decoder parameters in lm_head)
        n_params = sum(p.numel() for p in self.transformer.parameters())
        logger.info("number of parameters: %.2fM", n_params/1e6)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            if getattr(module, 'bias', None) is not None:
                torch.nn.init.zeros_(module.bias)
            torch.nn.init.ones_(module.weight)

    def configure_optimizers(self, train_config):
        """
        AdamW with weight decay on the weights of Linear layers only: biases, LayerNorm gains and
        embeddings are not decayed (shrinking them towards zero has no regularising meaning).
        Every trainable parameter lands in exactly one group (frozen ones, e.g. under LoRA, in none; LoRA's
        A and B are Linear weights, decayed towards zero: towards the pretrained model); a weight
        shared between lm_head and wte counts as the embedding it is.

        train_config.optimizer == 'muon': the Linear layers' weights inside the blocks take Muon
        (mingpt.muon, at muon_lr with muon_momentum and muon_weight_decay) and every other
        parameter takes AdamW, grouped as above, in one mingpt.muon.Muon optimizer.

        train_config.embedding_lr (None: learning_rate) is the AdamW lr of the embedding tables (wte,
        wpe; not a wte tied to lm_head): a row is updated only by the tokens that look it up, and a far
        higher rate than the head's suits it (nanochat and modded-nanogpt give their tables tens of times
        the head's).
        """
        embedding_ids = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        decay_ids = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)} - embedding_ids
        # with embedding_lr, the tables in a group of their own (a wte tied to lm_head is the head too: it stays)
        embedding_lr = getattr(train_config, 'embedding_lr', None)
        table_ids = embedding_ids - {id(self.lm_head.weight)} if embedding_lr is not None else set()
        # named_parameters dedups shared tensors
        params = [p for p in dict(self.named_parameters()).values() if p.requires_grad]
        decay = [p for p in params if id(p) in decay_ids]
        no_decay = [p for p in params if id(p) not in decay_ids | table_ids]
        tables = [p for p in params if id(p) in table_ids]
        optim_groups = [
            {"params": decay, "weight_decay": train_config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ] + ([{"params": tables, "weight_decay": 0.0, "lr": embedding_lr}] if tables else [])
        if getattr(train_config, 'optimizer', 'adamw') == 'muon':
            from mingpt.muon import Muon  # here: the default optimizer needs no import of it
            matrix_ids = {id(m.weight) for m in self.transformer.h.modules() if isinstance(m, nn.Linear)}
            optim_groups = [{'params': [p for p in params if id(p) in matrix_ids], 'muon': True,
                             'lr': train_config.muon_lr, 'momentum': train_config.muon_momentum,
                             'weight_decay': train_config.muon_weight_decay}] + \
                           [dict(g, params=[p for p in g['params'] if id(p) not in matrix_ids], muon=False,
                                 lr=g.get('lr', train_config.learning_rate)) for g in optim_groups]
            return Muon(optim_groups, betas=train_config.betas)
        # the fused kernel does the whole update in one pass over memory; foreach is the fallback
        fused = params[0].device.type in ('cuda', 'cpu')
        return torch.optim.AdamW(optim_groups, lr=train_config.learning_rate, betas=train_config.betas,
                                 fused=fused, foreach=None if fused else True)

    def resize_token_embeddings(self, vocab_size):
        """
        Grow the vocabulary to vocab_size tokens, in place: new rows at the end of the token embedding
        (wte), of lm_head and of any value embeddings, the old rows untouched, so every old token's logits
        stay exactly what they were. A tied lm_head stays tied to the new wte. The new rows start at the
        mean of the old ones: the new tokens' logits then start at the average logit, far below the likely
        tokens', so the model does not emit them before it is trained to. Returns the model.
        """
        old = self.config.vocab_size
        if vocab_size == old:
            return self
        if vocab_size < old:
            raise ConfigError(f"resize_token_embeddings only grows the vocabulary (the model has {old} "
                              f"tokens, asked for {vocab_size}); removing tokens would renumber nothing "
                              "but lose their rows")

        def grown(w):  # (old, C) -> (vocab_size, C), new rows at the mean of the old
            return torch.cat([w, w.mean(dim=0, keepdim=True).expand(vocab_size - old, -1)])

        def grown_table(table):  # a new nn.Embedding of vocab_size rows, holding grown(table.weight)
            w = table.weight
            new = nn.Embedding(vocab_size, w.size(1), device=w.device, dtype=w.dtype)
            with torch.no_grad():
                new.weight.copy_(grown(w))
            return new

        tied = self.lm_head.weight is self.transformer.wte.weight
        self.transformer.wte = grown_table(self.transformer.wte)
        if self.config.value_embeds:  # the value embeddings are token tables too
            self.transformer.ve = nn.ModuleList([grown_table(table) for table in self.transformer.ve])
        if tied:
            self.lm_head.weight = self.transformer.wte.weight
            self.lm_head.out_features = vocab_size
        else:
            head = self.lm_head.weight
            self.lm_head = Linear(head.size(1), vocab_size, bias=False, device=head.device, dtype=head.dtype)
            with torch.no_grad():
                self.lm_head.weight.copy_(grown(head))
        self.config.vocab_size = vocab_size
        logger.info("resized the vocabulary from %d to %d tokens%s", old, vocab_size,
                    " (lm_head tied to wte)" if tied else "")
        return self

    @classmethod
    def from_pretrained(cls, model_type_or_path, **kwargs):
        """
        A GPT with pretrained weights: a hub name ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl',
        'distilgpt2'), a Hugging Face directory (mingpt's own checkpoints are these), an OpenAI
        TensorFlow checkpoint directory or an llm.c .bin file. See mingpt.weights.load_pretrained.
        """
        from mingpt.weights import load_pretrained  # the one way in: mingpt.weights never imports this module
        return load_pretrained(model_type_or_path, cls, **kwargs)

    def save_pretrained(self, directory, format='hf', **kwargs):
        """
        write a Hugging Face GPT-2 directory (config.json + model.safetensors; mingpt.weights.save_hf),
        or with format='mingpt' a mingpt directory, which also holds the architecture options GPT-2
        has not (mingpt.weights.save_mingpt); from_pretrained reads both
        """
        from mingpt.weights import save_hf, save_mingpt  # as in from_pretrained
        if format not in ('hf', 'mingpt'):
            raise ConfigError(f"save_pretrained's format is 'hf' (transformers reads it) or 'mingpt' (any "
                              f"architecture option), not {format!r}")
        return (save_hf if format == 'hf' else save_mingpt)(self, directory, **kwargs)

    def forward(self, idx, targets=None, *, return_logits=True, kv_cache=None, cache_pos=0, last_only=False):
        """
        idx (B, T) token ids -> (logits (B, T, vocab_size), loss or None).
        targets (B, T): next-token ids; -1 marks positions that do not count in the loss.
        return_logits=False (with targets): (None, loss), the loss computed a chunk of positions at a
        time by mingpt.loss, never holding the (B, T, vocab_size) logits (the Trainer's way: faster
        and lighter with a big vocabulary).

        The keyword-only arguments serve incremental decoding (mingpt.decoder): kv_cache is a list
        of KVCache (one per layer), the new tokens written at positions [cache_pos, cache_pos+T)
        (also their position ids) and attending causally to everything before them; last_only
        computes logits for the last position only, (B, 1, vocab_size), skipping T-1 needless
        vocabulary projections. cache_pos may be a (B,) LongTensor, each row of the cache's first B
        at its own position (its T tokens at [cache_pos[b], cache_pos[b]+T)): a row then sees its own
        positions up to each token's only, whatever other rows (other sequences) hold.
        """
        device = idx.device
        if idx.dim() != 2:
            raise ConfigError(f"idx must be a (B, T) tensor of token ids, got shape {tuple(idx.shape)}; "
                              "for one sequence use idx[None]")
        b, t = idx.size()
        end, pos, attn_mask = cache_pos + t, None, None
        if torch.is_tensor(cache_pos):
            # each row at its own position (a batch of independent sequences): a row's token sees its
            # own row's keys only, up to its own position, and keys run to the furthest row's end
            assert cache_pos.shape == (b,), "cache_pos as a tensor holds one position per row"
            end = int(cache_pos.max()) + t
            pos = cache_pos[:, None] + torch.arange(t, device=device)  # (B, T)
            attn_mask = (torch.arange(end, device=device) <= pos[:, :, None])[:, None]  # (B, 1, T, end)
        if end > self.block_size:
            raise ConfigError(f"cannot forward a sequence of length {end}: the model's "
                              f"block_size (context length) is only {self.block_size}; crop the "
                              f"input to its last {self.block_size} tokens")
        if kv_cache is None and not torch.compiler.is_compiling():
            # an id outside the vocabulary would otherwise be torch's "index out of range in self";
            # one fused min/max per call (the decoding engine checks its prompts itself, and every
            # token it generates is in range, so its cached steps skip this)
            self._check_ids(idx, 'idx', 0)
            if targets is not None:
                if targets.shape != idx.shape:
                    raise ConfigError(f"targets must have idx's shape {tuple(idx.shape)}, got "
                                      f"{tuple(targets.shape)}: one next-token id per position")
                self._check_ids(targets, 'targets', -1)
        if pos is None:
            pos = torch.arange(cache_pos, cache_pos + t, dtype=torch.long, device=device)  # (T,)

        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.token_shift:
            before = None  # a step's first token finds the one before it in the cache, which keeps the ids
            if kv_cache is not None:
                prev = kv_cache[0].record_ids(cache_pos, idx)  # (B,), -1 at position 0
                before = self.transformer.wte(prev.clamp(min=0)) * (prev >= 0)[:, None].to(x.dtype)  # (B, C)
            x = self.transformer.shift(x, before)
        rotary = None
        if self.rope:  # positions enter in attention, as turns of the queries and keys
            rotary = rotary_angles(pos, self.config.n_embd // self.config.n_head, self.config.rope_base)
        else:
            x = x + self.transformer.wpe(pos)  # (T, C) or (B, T, C)
        x = self.transformer.drop(x)
        tables = self.transformer.ve if self.config.value_embeds else None
        for i, block in enumerate(self.transformer.h):
            ve = None if tables is None else tables[i](idx)  # (B, T, C)
            x = block(x, None if kv_cache is None else kv_cache[i], cache_pos, attn_mask, rotary, ve)
        x = self.transformer.ln_f(x)
        if targets is not None and not return_logits and type(self.lm_head) in (nn.Linear, Linear) \
                and self.lm_head.bias is None and worth_chunking(targets.numel(), self.lm_head.weight.size(0)):
            # (a LoRA or int8 lm_head computes its own logits; so does a small vocabulary, below)
            return None, linear_cross_entropy(x, self.lm_head.weight, targets, self.config.logit_softcap)
        if last_only:
            x = x[:, -1:, :]
        logits = self.lm_head(x)
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)

        # if we are given some desired targets also calculate the loss
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

        return (logits if return_logits or loss is None else None), loss

    def _check_ids(self, ids, name, lowest):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ConfigError(f"{name} must hold integer token ids, not {str(ids.dtype).removeprefix('torch.')}; "
                              "e.g. torch.tensor(ids, dtype=torch.long)")
        if ids.numel() == 0:
            return
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < lowest or hi >= self.config.vocab_size:
            raise ConfigError(f"{name} holds token ids from {lo} to {hi}, but this model's vocabulary "
                              f"has ids 0 to {self.config.vocab_size - 1}"
                              + (" (and -1 for targets that do not count)" if lowest < 0 else "")
                              + "; was the text encoded with another tokenizer, or is vocab_size too small?")

    def make_kv_cache(self, batch_size, max_len=None, dtype=None, device=None):
        """ one preallocated KVCache per layer, for up to max_len (default block_size) positions """
        p = self.transformer.wte.weight  # not lm_head's, which may be int8 (mingpt.quantize)
        C = self.config
        return [KVCache(batch_size, max_len or self.block_size, C.n_head, C.n_embd // C.n_head,
                        dtype=dtype or p.dtype, device=device or p.device, keep_ids=C.token_shift and i == 0)
                for i in range(C.n_layer)]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, do_sample=False, top_k=None, **kwargs):
        """
        Take a conditioning sequence of indices idx (LongTensor of shape (b,t)) and complete
        the sequence max_new_tokens times, feeding the predictions back into the model each time.
        Greedy by default (do_sample=False); returns (b, t + max_new_tokens).
        Most likely you'll want to make sure to be in model.eval() mode of operation for this.

        Prefills a KV cache once and then decodes one token per step (use_cache=False recomputes
        everything, as minGPT did, for the same tokens). More keyword arguments: top_p, seed,
        generator, eos_token_id, pad_token_id, attention_mask (or pass idx as a list of 1-D
        prompts), use_cache, window_keep, options (a SamplingOptions); see mingpt.generate.stream.
        """
        options = kwargs.pop('options', None)  # a mingpt.sampling.SamplingOptions, instead of its fields
        if options is None:
            kwargs.update(temperature=temperature, do_sample=do_sample, top_k=top_k)
        elif (temperature, do_sample, top_k) != (1.0, False, None):
            raise ConfigError("give the sampling options either as options= or as keywords, not both")
        return complete(self, idx, max_new_tokens, options, **kwargs)
