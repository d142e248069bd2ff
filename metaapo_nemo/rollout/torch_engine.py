"""A plain-torch rollout engine for Llama/Qwen2 decoders with a KV cache, on CPU or CUDA.

Each prompt is prefilled once. Its K samples then decode side by side and read the prompt's cached
keys and values once per step for all K of them (a cascade: the prompt part of attention is one
matmul per prompt, the samples' own tokens one per sample, under one softmax). Prompts are
right-padded in a batch; padded prompt keys are masked out and every row rotates its new tokens at
its own positions. Each sample's own keys and values go into a cache allocated once per batch at
its final length. Rows that hit eos keep riding with their prompt's other samples.

Two decode paths share every math function. The dynamic one (the CPU default) drops a prompt from
the batch when all K of its samples are done and attends over the slots written so far. The static
one (the CUDA default) keeps every shape fixed for the batch, so that one decode step is captured
as a CUDA graph and replayed: the host launches one graph per step instead of hundreds of small
kernels. Sampling stays outside the graph, with one generator per prompt on the engine's device.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from metaapo_nemo.models.config import LLAMA3_ROPE, ModelConfig
from metaapo_nemo.rollout.engine import GenerationStats, SamplingParams, check_prompts


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm as Hugging Face computes it: statistics in float32, the scale in the model dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding in the non-interleaved (Hugging Face) layout: element i of a head
    pairs with element i + head_dim/2."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def rotary_tables(cfg: ModelConfig, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of every position's rotation angles, [max_position_embeddings, head_dim],
    computed in float32 and then cast, as Hugging Face does."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if cfg.rope_scaling_factor is not None:
        inv_freq = llama3_scaled(inv_freq, cfg.rope_scaling_factor)
    angles = torch.outer(torch.arange(cfg.max_position_embeddings).float(), inv_freq)
    angles = torch.cat((angles, angles), -1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def llama3_scaled(inv_freq: Tensor, factor: float) -> Tensor:
    """Llama 3.1's RoPE frequency scaling: long wavelengths slowed by `factor`, short ones kept,
    a smooth blend between (the same rule Megatron and Hugging Face apply)."""
    low, high, context = (LLAMA3_ROPE[k] for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, blended, scaled)


def right_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Prompts as one right-padded [P, max_len] token tensor, and their lengths [P]."""
    lengths = torch.tensor([len(p) for p in prompts])
    tokens = torch.full((len(prompts), int(lengths.max())), pad_token_id)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    return tokens, lengths


def nucleus(probs: Tensor, top_p: float) -> Tensor:
    """Zero every token outside the smallest most-likely set whose mass reaches top_p (nucleus
    sampling, Holtzman et al. 2020); the most likely token always stays."""
    sorted_probs, order = probs.sort(-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def sample(logits: Tensor, params: SamplingParams, generators: list[torch.Generator], rows_per_generator: int) -> Tensor:
    """One next token per row of float32 logits [rows, vocab]; consecutive blocks of
    `rows_per_generator` rows draw from their own generator (one generator: all rows)."""
    if params.greedy:
        return logits.argmax(-1)
    probs = (logits / params.temperature).softmax(-1)
    if params.top_p < 1.0:
        probs = nucleus(probs, params.top_p)
    # torch.multinomial draws one sample as argmax(p / q) with q ~ Exp(1), but first checks the
    # probabilities with two host syncs per call; this is the same draw (bit for bit on CPU)
    # without them, so a CUDA decode loop does not stall once per prompt per step.
    q = torch.empty_like(probs)
    for block, generator in zip(q.split(rows_per_generator), generators):
        block.exponential_(generator=generator)
    return (probs / q).argmax(-1)


def cascade_attention(
    q: Tensor, prompt_k: Tensor, prompt_v: Tensor, prompt_bias: Tensor, own_k: Tensor, own_v: Tensor,
    own_bias: Tensor | None = None,
) -> Tensor:
    """Attention of one decode step for rows that share prompts, one softmax over prompt + own keys.

    q [R, kv_heads, group, head_dim], already scaled, with R = P * K rows ordered prompt-major;
    prompt_k/v [P, kv_heads, Lp, head_dim]; prompt_bias [P, 1, 1, Lp] (0, or -inf on padding);
    own_k/v [R, kv_heads, t, head_dim], each row's generated tokens; own_bias [t] (0, or -inf on
    slots not written yet), or None when every slot holds a token. Returns [R, kv_heads, group,
    head_dim]. Every prompt key is read once per prompt instead of once per sample.
    """
    num_prompts, kv_heads, prompt_len, head_dim = prompt_k.shape
    rows, _, group, _ = q.shape
    k = rows // num_prompts

    def by_prompt(x: Tensor) -> Tensor:  # [R, kv, g, n] -> [P, kv, K*g, n]
        return x.reshape(num_prompts, k, kv_heads, group, -1).transpose(1, 2).reshape(
            num_prompts, kv_heads, k * group, -1
        )

    def by_row(x: Tensor) -> Tensor:  # [P, kv, K*g, n] -> [R, kv, g, n]
        return x.reshape(num_prompts, kv_heads, k, group, -1).transpose(1, 2).reshape(
            rows, kv_heads, group, -1
        )

    prompt_scores = by_row(by_prompt(q) @ prompt_k.transpose(-1, -2) + prompt_bias)
    own_scores = q @ own_k.transpose(-1, -2)
    if own_bias is not None:
        own_scores = own_scores + own_bias
    probs = torch.cat((prompt_scores, own_scores), -1).softmax(-1, dtype=torch.float32).to(q.dtype)
    prompt_probs, own_probs = probs.split((prompt_len, own_k.shape[2]), -1)
    return by_row(by_prompt(prompt_probs) @ prompt_v) + own_probs @ own_v


class TorchEngine:
    """RolloutEngine on plain torch: Llama/Qwen2 decoder (RMSNorm, SwiGLU, RoPE, GQA, optional
    q/k/v bias, optionally tied embeddings) with a KV cache.

    max_batch_size: rows (prompts x samples) decoded together; more prompts are done in
        consecutive batches.
    dtype: of weights, activations and the KV cache (bfloat16 on GPUs); logits and sampling are
        float32.
    device: where weights, caches and sampling live (None: "cpu"); results come back as lists.
    cuda_graphs: on CUDA, capture the static decode step once per batch as a CUDA graph and
        replay it every step (no effect on CPU or with static_decode=False).
    static_decode: decode every step over fixed-shape buffers (all rows ride to the end of the
        batch, attention reads the whole preallocated own cache under a mask), as a CUDA graph
        needs; None: on CUDA only. The CPU keeps the dynamic path: it measured as fast there at
        the tiny sizes, and it keeps CPU results bit for bit what they were (the static path's
        longer masked softmax rounds differently, so sampled tokens drift).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        eos_token_id: int,
        pad_token_id: int,
        max_batch_size: int = 256,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        cuda_graphs: bool = True,
        static_decode: bool | None = None,
    ) -> None:
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(
                f"hidden_size {cfg.hidden_size} must be a multiple of num_attention_heads "
                f"{cfg.num_attention_heads}"
            )
        if cfg.num_attention_heads % cfg.num_query_groups:
            raise ValueError(
                f"num_attention_heads {cfg.num_attention_heads} must be a multiple of "
                f"num_query_groups {cfg.num_query_groups}"
            )
        for name, token in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
            if not 0 <= token < cfg.vocab_size:
                raise ValueError(f"{name} {token} is outside the vocabulary [0, {cfg.vocab_size})")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
        try:
            device = torch.device("cpu" if device is None else device)
        except RuntimeError:
            raise ValueError(f"device {device!r} is not a torch device; give e.g. 'cpu', 'cuda' or 'cuda:0'") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device} asked for, but this torch sees no CUDA device; use device='cpu'")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device {device}: the torch engine runs on 'cpu' or 'cuda'")
        self.cfg = cfg
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.dtype = dtype
        self.device = device
        self.static_decode = device.type == "cuda" if static_decode is None else static_decode
        self.cuda_graphs = cuda_graphs and device.type == "cuda" and self.static_decode
        self.stats = GenerationStats()
        self._refitted = False
        self._cos, self._sin = (t.to(device) for t in rotary_tables(cfg, dtype))
        self._allocate()

    def _allocate(self) -> None:
        """One buffer per fused matmul (q|k|v, gate|up), and a view into it per Hugging Face
        name, so refit copies in place and decoding does two matmuls fewer per layer."""
        cfg, hd = self.cfg, self.cfg.head_dim
        q_rows, kv_rows = cfg.num_attention_heads * hd, cfg.num_query_groups * hd
        h, f = cfg.hidden_size, cfg.ffn_hidden_size

        def buffer(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=self.dtype, device=self.device)

        self._embed = buffer(cfg.vocab_size, h)
        self._final_norm = buffer(h)
        self._lm_head = self._embed if cfg.tie_word_embeddings else buffer(cfg.vocab_size, h)
        self._slots = {
            "model.embed_tokens.weight": self._embed,
            "model.norm.weight": self._final_norm,
        }
        if not cfg.tie_word_embeddings:
            self._slots["lm_head.weight"] = self._lm_head
        self._layers = []
        for i in range(cfg.num_layers):
            layer = {
                "qkv": buffer(q_rows + 2 * kv_rows, h),
                "qkv_bias": buffer(q_rows + 2 * kv_rows) if cfg.qkv_bias else None,
                "o": buffer(h, q_rows),
                "gate_up": buffer(2 * f, h),
                "down": buffer(h, f),
                "norm1": buffer(h),
                "norm2": buffer(h),
            }
            self._layers.append(layer)
            p = f"model.layers.{i}."
            for proj, lo, hi in (
                ("q", 0, q_rows), ("k", q_rows, q_rows + kv_rows), ("v", q_rows + kv_rows, None)
            ):
                self._slots[f"{p}self_attn.{proj}_proj.weight"] = layer["qkv"][lo:hi]
                if cfg.qkv_bias:
                    self._slots[f"{p}self_attn.{proj}_proj.bias"] = layer["qkv_bias"][lo:hi]
            self._slots[f"{p}self_attn.o_proj.weight"] = layer["o"]
            self._slots[f"{p}mlp.gate_proj.weight"] = layer["gate_up"][:f]
            self._slots[f"{p}mlp.up_proj.weight"] = layer["gate_up"][f:]
            self._slots[f"{p}mlp.down_proj.weight"] = layer["down"]
            self._slots[f"{p}input_layernorm.weight"] = layer["norm1"]
            self._slots[f"{p}post_attention_layernorm.weight"] = layer["norm2"]

    @torch.no_grad()
    def refit(self, hf_state_dict: Mapping[str, Tensor]) -> None:
        """Copy the policy's weights (Hugging Face names) into the engine's buffers in place.
        Everything is checked before anything is copied, so a bad dict leaves the engine as it was.
        With tied embeddings, an lm_head.weight equal to the embedding is accepted (HF's
        state_dict lists it) and any other is refused."""
        if not self._slots:  # released
            self._allocate()
        given = set(hf_state_dict)
        tied_head = self.cfg.tie_word_embeddings and "lm_head.weight" in given
        if tied_head:
            given.discard("lm_head.weight")
        missing, unexpected = sorted(set(self._slots) - given), sorted(given - set(self._slots))
        if missing or unexpected:
            raise ValueError(
                f"refit state dict does not match the engine's {self.cfg}: missing {missing}, "
                f"unexpected {unexpected}"
            )
        wrong = [
            f"{name}: got {tuple(hf_state_dict[name].shape)}, expected {tuple(slot.shape)}"
            for name, slot in self._slots.items()
            if hf_state_dict[name].shape != slot.shape
        ]
        if wrong:
            raise ValueError("refit tensors have wrong shapes: " + "; ".join(wrong))
        if tied_head and not torch.equal(
            hf_state_dict["lm_head.weight"], hf_state_dict["model.embed_tokens.weight"]
        ):
            raise ValueError(
                "config ties word embeddings but lm_head.weight differs from "
                "model.embed_tokens.weight; set tie_word_embeddings=False for this model"
            )
        for name, slot in self._slots.items():
            slot.copy_(hf_state_dict[name])
        self._refitted = True

    def release(self) -> None:
        """Free the weights until the next refit, which allocates them again: the loop calls it
        after sampling, so training gets the memory back (16 GB for an 8B model in bf16)."""
        self._refitted = False
        self._embed = self._final_norm = self._lm_head = None
        self._slots, self._layers = {}, []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _layer_qkv(self, layer: dict, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q_rows = self.cfg.num_attention_heads * self.cfg.head_dim
        kv_rows = self.cfg.num_query_groups * self.cfg.head_dim
        h = rms_norm(x, layer["norm1"], self.cfg.norm_epsilon)
        qkv = F.linear(h, layer["qkv"], layer["qkv_bias"])
        return qkv.split((q_rows, kv_rows, kv_rows), -1)

    def _layer_rest(self, layer: dict, x: Tensor, attn: Tensor) -> Tensor:
        """Attention output projection, residual, SwiGLU MLP, residual."""
        x = x + F.linear(attn, layer["o"])
        h = rms_norm(x, layer["norm2"], self.cfg.norm_epsilon)
        gate, up = F.linear(h, layer["gate_up"]).chunk(2, -1)
        return x + F.linear(F.silu(gate) * up, layer["down"])

    def _prefill(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, list]:
        """Right-padded prompts [P, L] (and their lengths [P], both on the CPU) -> final-norm hidden
        states [P, L, hidden] and each layer's rotated keys and values [P, kv_heads, L, head_dim]."""
        cfg, hd = self.cfg, self.cfg.head_dim
        num_prompts, length = tokens.shape
        cos, sin = self._cos[:length], self._sin[:length]
        mask = None
        if bool((lengths < length).any()):
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            mask = (causal & (torch.arange(length) < lengths[:, None])[:, None, :])[:, None].to(self.device)
        x = self._embed[tokens.to(self.device)]
        cache = []
        for layer in self._layers:
            q, k, v = self._layer_qkv(layer, x)
            q = rotate(q.view(num_prompts, length, -1, hd).transpose(1, 2), cos, sin)
            k = rotate(k.view(num_prompts, length, -1, hd).transpose(1, 2), cos, sin)
            v = v.view(num_prompts, length, -1, hd).transpose(1, 2)
            attn = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True
            )
            x = self._layer_rest(layer, x, attn.transpose(1, 2).reshape(num_prompts, length, -1))
            cache.append((k, v))
        return rms_norm(x, self._final_norm, cfg.norm_epsilon), cache

    def _decode(
        self,
        tokens: Tensor,
        positions: Tensor,
        step: Tensor,
        prompt_cache: list,
        prompt_bias: Tensor,
        own_cache: list,
        own_bias: Tensor | None = None,
    ) -> Tensor:
        """One token per row at its own position; writes the row's keys/values at slot `step` (a
        one-element index tensor) of its own cache, attends over every slot of that cache (masked
        by `own_bias` where given) and returns float32 next-token logits [R, vocab]."""
        cfg, hd = self.cfg, self.cfg.head_dim
        rows, group = tokens.shape[0], cfg.num_attention_heads // cfg.num_query_groups
        cos, sin = self._cos[positions][:, None], self._sin[positions][:, None]
        x = self._embed[tokens]
        for layer, (prompt_k, prompt_v), (own_k, own_v) in zip(
            self._layers, prompt_cache, own_cache
        ):
            q, k, v = self._layer_qkv(layer, x)
            q = rotate(q.view(rows, -1, hd), cos, sin) * hd**-0.5
            own_k.index_copy_(2, step, rotate(k.view(rows, -1, hd), cos, sin)[:, :, None])
            own_v.index_copy_(2, step, v.view(rows, -1, hd)[:, :, None])
            attn = cascade_attention(
                q.view(rows, cfg.num_query_groups, group, hd),
                prompt_k, prompt_v, prompt_bias, own_k, own_v, own_bias,
            )
            x = self._layer_rest(layer, x, attn.reshape(rows, -1))
        return F.linear(rms_norm(x, self._final_norm, cfg.norm_epsilon), self._lm_head).float()

    def _generate_batch(
        self, prompts: list[list[int]], params: SamplingParams, generators: list[torch.Generator] | None,
        generator: torch.Generator,
    ) -> list[list[int]]:
        """Responses for a batch of prompts, as rows ordered prompt-major (K rows per prompt).
        With `generators` (one per prompt) each prompt's K rows draw from its own generator."""
        k, steps, device = params.num_samples, params.max_new_tokens, self.device
        tokens, lengths = right_pad(prompts, self.pad_token_id)
        hidden, prompt_cache = self._prefill(tokens, lengths)
        prompt_bias = torch.zeros(tokens.shape, dtype=self.dtype)
        prompt_bias.masked_fill_(torch.arange(tokens.shape[1]) >= lengths[:, None], float("-inf"))
        prompt_bias = prompt_bias[:, None, None].to(device)
        lengths = lengths.to(device)
        last = hidden[torch.arange(len(prompts), device=device), lengths - 1]
        logits = F.linear(last, self._lm_head).float().repeat_interleave(k, 0)

        rows = len(prompts) * k
        # Allocated once at the batch's final length: decoding writes into it and never grows it.
        # Zeros, not empty: the static path reads unwritten slots (masked), and 0 * NaN garbage
        # would still be NaN.
        kv_shape = (rows, self.cfg.num_query_groups, steps, self.cfg.head_dim)

        def zeros() -> Tensor:
            return torch.zeros(kv_shape, dtype=self.dtype, device=device)

        own_cache = [(zeros(), zeros()) for _ in self._layers]
        out = torch.empty(rows, steps, dtype=torch.long, device=device)
        out_len = torch.full((rows,), steps, device=device)
        row_ids = torch.arange(rows, device=device)  # original row of each row still decoding
        positions = lengths.repeat_interleave(k)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        active = generators  # the generators of the prompts still decoding, in row order
        if self.static_decode:
            decode = StaticDecode(self, prompt_cache, prompt_bias, own_cache, positions)
        else:
            slots = torch.arange(steps, device=device)
        for step in range(steps):
            token = sample(logits, params, active, k) if active else sample(logits, params, [generator], rows)
            out[row_ids, step] = token
            finished = (token == self.eos_token_id) & ~done
            out_len[row_ids] = torch.where(finished, step + 1, out_len[row_ids])
            done |= finished
            if step == steps - 1:
                break
            prompt_done = done.view(-1, k).all(1)
            if bool(prompt_done.all()):
                break
            if self.static_decode:  # finished rows keep riding: the shapes stay fixed
                logits = decode(token)
                continue
            if bool(prompt_done.any()):
                keep, keep_rows = ~prompt_done, (~prompt_done).repeat_interleave(k)
                prompt_cache = [(pk[keep], pv[keep]) for pk, pv in prompt_cache]
                prompt_bias = prompt_bias[keep]
                own_cache = [(ok[keep_rows], ov[keep_rows]) for ok, ov in own_cache]
                token, positions = token[keep_rows], positions[keep_rows]
                row_ids, done = row_ids[keep_rows], done[keep_rows]
                rows = int(keep_rows.sum())
                if active:
                    active = [g for g, kept in zip(active, keep.tolist()) if kept]
            written = [(ok[:, :, : step + 1], ov[:, :, : step + 1]) for ok, ov in own_cache]
            logits = self._decode(token, positions, slots[step : step + 1], prompt_cache, prompt_bias, written)
            positions = positions + 1
        return [row[:n] for row, n in zip(out.tolist(), out_len.tolist())]

    def _check_prompts(self, prompts: list[list[int]], max_new_tokens: int, prompt_seeds=None) -> None:
        check_prompts(prompts, self.cfg.vocab_size, prompt_seeds)
        limit = self.cfg.max_position_embeddings
        for i, p in enumerate(prompts):
            if len(p) + max_new_tokens > limit:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it "
                    f"exceeds max_position_embeddings={limit}: shorten the prompt or lower "
                    "max_new_tokens"
                )

    @torch.inference_mode()
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, prompt_seeds: list[int] | None = None
    ) -> list[list[list[int]]]:
        """Responses as [prompt][sample] -> token ids; a response ends with eos when eos was
        generated and is cut at params.max_new_tokens otherwise. Prompts are batched by length;
        the result is in the caller's order and depends only on the prompts, weights and params.
        With `prompt_seeds`, each prompt's samples come from a generator seeded by its own seed,
        so they do not depend on which other prompts share the call (or the rank)."""
        if not self._refitted:
            raise RuntimeError("the engine has no weights yet: call refit(policy_state_dict) first")
        if params.num_samples > self.max_batch_size:
            raise ValueError(
                f"num_samples {params.num_samples} exceeds max_batch_size {self.max_batch_size}"
            )
        self._check_prompts(prompts, params.max_new_tokens, prompt_seeds)
        start = time.perf_counter()
        generator = torch.Generator(self.device).manual_seed(params.seed)
        by_length = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        per_batch = self.max_batch_size // params.num_samples
        results: list[list[list[int]]] = [[] for _ in prompts]
        for first in range(0, len(prompts), per_batch):
            batch = by_length[first : first + per_batch]
            generators = None if prompt_seeds is None else [
                torch.Generator(self.device).manual_seed(prompt_seeds[i]) for i in batch]
            responses = self._generate_batch([prompts[i] for i in batch], params, generators, generator)
            for j, i in enumerate(batch):
                results[i] = responses[j * params.num_samples : (j + 1) * params.num_samples]
        self.stats = GenerationStats(
            new_tokens=sum(len(r) for sample_set in results for r in sample_set),
            seconds=time.perf_counter() - start,
        )
        return results

    @torch.inference_mode()
    def prompt_logits(self, prompts: list[list[int]]) -> list[Tensor]:
        """Float32 next-token logits at every position of each prompt, [len(prompt), vocab]: lets
        a caller check that a refit reproduces the policy."""
        if not self._refitted:
            raise RuntimeError("the engine has no weights yet: call refit(policy_state_dict) first")
        self._check_prompts(prompts, 0)
        logits = []
        for first in range(0, len(prompts), self.max_batch_size):
            batch = prompts[first : first + self.max_batch_size]
            tokens, lengths = right_pad(batch, self.pad_token_id)
            hidden, _ = self._prefill(tokens, lengths)
            all_logits = F.linear(hidden, self._lm_head).float().cpu()
            logits += [row[:n] for row, n in zip(all_logits, lengths.tolist())]
        return logits


class StaticDecode:
    """A batch's decode step with fixed shapes: called with each step's tokens [R], it returns the
    next logits. Tokens, positions and the step index live in buffers advanced in place, and
    attention reads every slot of the preallocated own cache with the unwritten ones masked, so
    each step runs the same kernels on the same memory; with the engine's cuda_graphs it is
    captured once as a CUDA graph and replayed."""

    def __init__(self, engine: TorchEngine, prompt_cache: list, prompt_bias: Tensor, own_cache: list, positions: Tensor):
        self.engine, self.prompt_cache, self.prompt_bias, self.own_cache = engine, prompt_cache, prompt_bias, own_cache
        self.tokens, self.positions = torch.zeros_like(positions), positions.clone()
        self.step = torch.zeros(1, dtype=torch.long, device=positions.device)
        self.slots = torch.arange(own_cache[0][0].shape[2], device=positions.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None

    def _decode(self) -> Tensor:
        own_bias = torch.zeros(self.slots.shape, dtype=self.engine.dtype, device=self.slots.device)
        own_bias.masked_fill_(self.slots > self.step, float("-inf"))
        return self.engine._decode(
            self.tokens, self.positions, self.step, self.prompt_cache, self.prompt_bias, self.own_cache, own_bias
        )

    def __call__(self, tokens: Tensor) -> Tensor:
        self.tokens.copy_(tokens)
        if not self.engine.cuda_graphs:
            self.logits = self._decode()
        else:
            if self.graph is None:
                self.graph, self.logits = capture_cuda_graph(self._decode, self.slots.device)
            self.graph.replay()
        self.positions.add_(1)
        self.step.add_(1)
        return self.logits


def capture_cuda_graph(fn: Callable[[], Tensor], device: torch.device) -> tuple[torch.cuda.CUDAGraph, Tensor]:
    """`fn` captured as a CUDA graph, and the tensor each replay refills with its result. As
    PyTorch's CUDA-graph notes ask, fn first runs a few times on a side stream so that lazy set-up
    (cuBLAS handles and workspaces, allocator blocks) happens before capture; fn must therefore be
    safe to repeat (a decode step rewrites the same cache slot with the same values)."""
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
    return graph, out
