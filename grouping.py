"""
The paper's input projection: GroupViT-style grouping of ImageBind's grid features into concept tokens. Learnable group
tokens attend to the patch features, every patch is assigned to one group (hard, Gumbel-softmax while training), and
the groups merge their patches; two grouping stages take L patches to 64 groups, then to 8 concepts, each one LLM token.

References
- Wu et al., NExT-GPT, ICML 2024 (the concept grouping of the encoding side), https://arxiv.org/abs/2309.05519; the new
  code: nextgpt/model/multimodal_projector/projector.py (GroupProjector) and group.py (its GroupViT blocks)
- Xu et al., GroupViT: Semantic Segmentation Emerges from Text Supervision, CVPR 2022, https://arxiv.org/abs/2202.11094
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from encoder import Mlp


class MixerMlp(Mlp):
    """An MLP across tokens instead of channels: maps S1 group tokens to S2."""

    def forward(self, x):  # (B, S1, C) -> (B, S2, C)
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class GroupAttention(nn.Module):
    """group.Attention: separate q/k/v (cross-attention) or fused qkv (self-attention)."""

    def __init__(self, dim, heads, qkv_bias, fused):
        super().__init__()
        self.heads = heads
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
            self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
            self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, key=None):
        B, N, C = x.shape
        if key is None:
            q, k, v = self.qkv(x).split(C, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(key), self.v_proj(key)
        split = lambda t: t.view(B, -1, self.heads, C // self.heads).transpose(1, 2)  # noqa: E731 (B, h, L, hs)
        y = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class AttnBlock(nn.Module):
    def __init__(self, dim, heads, qkv_bias=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GroupAttention(dim, heads, qkv_bias, fused=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CrossAttnBlock(nn.Module):
    """group.CrossAttnBlock with post_norm=True (the only form GroupingBlock uses)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.attn = GroupAttention(dim, heads, qkv_bias=True, fused=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.norm_post = nn.LayerNorm(dim)

    def forward(self, query, key):
        x = query + self.attn(query, key)
        x = x + self.mlp(self.norm2(x))
        return self.norm_post(x)


class AssignAttention(nn.Module):
    """
    Hard assignment of every input token to one group: a one-head attention whose softmax runs over the groups
    (dim -2), made one-hot (Gumbel noise while training, argmax at eval) with a straight-through gradient.
    """

    def __init__(self, dim, tau=1.0, eps=1.0):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.tau, self.eps = tau, eps
        self.scale = dim ** -0.5

    def assign(self, logits):
        """(B, S, L) logits of L tokens over S groups -> one-hot over S, gradients of the soft version."""
        if self.training:  # gumbel_softmax(hard=True): sample a group per token
            gumbels = -torch.empty_like(logits).exponential_().log()
            logits = (logits + gumbels) / self.tau
        soft = logits.softmax(dim=-2)
        hard = torch.zeros_like(soft).scatter_(-2, soft.argmax(dim=-2, keepdim=True), 1.0)
        return hard - soft.detach() + soft  # value: hard; gradient: soft's (straight-through)

    def forward(self, groups, x):
        attn = self.assign(self.q_proj(groups) @ self.k_proj(x).transpose(-2, -1) * self.scale)  # (B, S, L)
        attn = attn / (attn.sum(dim=-1, keepdim=True) + self.eps)  # each group: the mean of its tokens (eps 1)
        return self.proj(attn @ self.v_proj(x)), attn  # (B, S, C)


class GroupingBlock(nn.Module):
    """group.GroupingBlock: S1 group tokens -> S2 groups, then every token is assigned to one group and merged into
    it."""

    def __init__(self, dim, heads, num_group_token, num_output_group):
        super().__init__()
        self.norm_tokens = nn.LayerNorm(dim)
        self.mlp_inter = MixerMlp(num_group_token, dim // 2, num_output_group)  # across tokens, mlp_ratio (0.5, 4)
        self.norm_post_tokens = nn.LayerNorm(dim)
        self.norm_x = nn.LayerNorm(dim)
        self.pre_assign_attn = CrossAttnBlock(dim, heads)
        self.assign = AssignAttention(dim)
        self.norm_new_x = nn.LayerNorm(dim)
        self.mlp_channels = Mlp(dim, 4 * dim, dim)

    def forward(self, x, group_tokens):
        x = self.norm_x(x)  # (B, L, C)
        groups = self.mlp_inter(self.norm_tokens(group_tokens))  # (B, S1, C) -> (B, S2, C)
        groups = self.pre_assign_attn(self.norm_post_tokens(groups), x)
        new_x, self.last_assignment = self.assign(groups, x)
        new_x = new_x + groups
        return new_x + self.mlp_channels(self.norm_new_x(new_x))  # (B, S2, C); `reduction` is Identity here


class GroupingLayer(nn.Module):
    """group.GroupingLayer: transformer blocks over [tokens; group tokens], then (except the last) a GroupingBlock."""

    def __init__(self, dim, depth, heads, num_group_token, num_output_group, prev_group_token):
        super().__init__()
        self.num_group_token = num_group_token
        self.group_token = nn.Parameter(torch.zeros(1, num_group_token, dim)) if num_group_token else None
        if self.group_token is not None and not prev_group_token:
            nn.init.trunc_normal_(self.group_token, std=0.02)  # the first stage's groups start random, later ones 0
        self.blocks = nn.ModuleList(AttnBlock(dim, heads) for _ in range(depth))
        self.downsample = GroupingBlock(dim, heads, num_group_token, num_output_group) if num_group_token else None
        # later stages derive their group tokens from the previous stage's (MixerMlp over tokens)
        self.group_projector = nn.Sequential(nn.LayerNorm(dim), MixerMlp(prev_group_token, dim // 2, num_group_token)) \
            if num_group_token and prev_group_token else None

    def forward(self, x, prev_group_token=None):
        if self.group_token is None:
            for blk in self.blocks:
                x = blk(x)
            return x, None
        g = self.group_token.expand(x.shape[0], -1, -1)
        if self.group_projector is not None:
            g = g + self.group_projector(prev_group_token)
        x = torch.cat([x, g], dim=1)  # (B, L + S, C)
        for blk in self.blocks:
            x = blk(x)
        x, g = x[:, :-self.num_group_token], x[:, -self.num_group_token:]
        return self.downsample(x, g), g


class GroupProjector(nn.Module):
    """
    The paper's input projection: ImageBind grid features (B, L, 1024) -> in_fc -> stage 1 (6 blocks, 64 group
    tokens, grouped into 64) -> stage 2 (3 blocks, 8 tokens, grouped into 8) -> stage 3 (3 blocks) -> LayerNorm ->
    out_fc -> (B, 8, D): 8 concept tokens per input.
    """

    def __init__(self, in_dim, out_dim, dim=512, depths=(6, 3, 3), group_tokens=(64, 8), heads=8):
        super().__init__()
        self.in_fc = nn.Linear(in_dim, dim)
        tokens = list(group_tokens) + [0]
        self.layers = nn.ModuleList(
            GroupingLayer(dim, depths[i], heads, tokens[i], tokens[i], tokens[i - 1] if i else 0)
            for i in range(len(depths)))
        self.norm = nn.LayerNorm(dim)
        self.out_fc = nn.Linear(dim, out_dim)

    def forward(self, x):
        x, g = self.in_fc(x), None  # (B, L, dim)
        for layer in self.layers:
            x, g = layer(x, g)  # L -> 64 -> 8 tokens
        return self.out_fc(self.norm(x))  # (B, 8, out_dim)
