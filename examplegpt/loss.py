"""Cross-entropy of the LM head, fused with the head's matmul and computed in chunks of rows.

The plain way materialises (B*T, V) logits, then a float32 copy, then log-softmax, then their
gradients: several passes over the largest tensor of the step (for GPT-2 small at batch 16 x 1024,
3.3 GB in float32). Here each chunk's logits are made, turned into softmax - onehot in place, and
used at once for both gradients (dL/dh = G @ W, dL/dW += G^T @ h). The gradients are ready when
the forward pass ends, so backward only scales them. Same FLOPs as the plain way; one chunk of
logits in memory at a time.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # a target that is not scored: PyTorch's and Hugging Face's convention (F.cross_entropy's default)


def loss_and_gradients(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    chunk_rows: int,
    with_grads: bool,
    buffer: torch.Tensor | None = None,
    row_losses: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Summed cross-entropy of h (N, C) @ weight.T (V_padded, C) against targets (N,; IGNORE_INDEX not scored), and,
    with_grads, its gradients with respect to h and weight (for the summed loss).

    `buffer`: float32 (>= min(chunk_rows, N), V_padded) scratch for the logits, for a caller that calls many
    times (evaluation) and so keeps one; by default each call makes its own. `row_losses`: float32 (N,), filled
    with each row's loss (0 where not scored), for a caller that adds them up its own way."""
    compute_dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
    with torch.autocast(h.device.type, enabled=False):
        w = weight.to(compute_dtype)
        grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device) if with_grads else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if with_grads else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        # One logits buffer for every chunk, worked on in place: on CPU a fresh 200 MB tensor per chunk
        # costs more in page faults than the softmax itself.
        if buffer is None:
            buffer = torch.empty(min(chunk_rows, h.shape[0]), weight.shape[0], dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_rows):
            hs = h[start : start + chunk_rows].to(compute_dtype)  # (c, C)
            ts = targets[start : start + chunk_rows]  # (c,)
            logits = buffer[: hs.shape[0]]  # (c, V_padded) float32
            if compute_dtype == torch.float32:
                torch.mm(hs, w.t(), out=logits)
            else:
                logits.copy_(hs @ w.t())
            logits[:, vocab_size:] = float("-inf")  # padding rows of the vocabulary are never predicted
            log_probs = torch.log_softmax(logits, dim=-1, out=logits)  # (c, V_padded), in place
            valid = ts != IGNORE_INDEX
            safe = ts.clamp(min=0)[:, None]  # (c, 1)
            row_loss = -(log_probs.gather(1, safe).squeeze(1) * valid)  # (c,)
            total += row_loss.sum()
            if row_losses is not None:
                row_losses[start : start + chunk_rows] = row_loss
            if not with_grads:  # evaluation: the loss is all that is wanted
                continue
            probs = log_probs.exp_()  # softmax, in place
            probs.scatter_(
                1, safe, probs.gather(1, safe) - 1
            )  # softmax - onehot (scatter_, not scatter_add_: deterministic on CUDA too)
            if not valid.all():
                probs.mul_(valid[:, None])  # ignored rows contribute nothing
            g = probs.to(compute_dtype)
            grad_h[start : start + chunk_rows] = (g @ w).to(h.dtype)  # (c, C)
            if compute_dtype == torch.bfloat16:  # on the tensor cores (AMX); in float32, a GPU's general cores
                grad_w += g.t() @ hs  # (V_padded, C)
            else:  # float32; and float16, whose range (65,504) a chunk's sum over one target can pass
                grad_w.addmm_(g.t().float(), hs.float())
    return total, grad_h, grad_w


class FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, chunk_rows: int):
        total, grad_h, grad_w = loss_and_gradients(h, weight, targets, vocab_size, chunk_rows, with_grads=True)
        valid_count = (targets != IGNORE_INDEX).sum()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype), valid_count)
        return total / valid_count  # no target scored: NaN, as F.cross_entropy gives

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w, valid_count = ctx.saved_tensors
        scale = grad_loss / valid_count.clamp(min=1)  # no target scored: zero gradients, as F.cross_entropy gives
        return grad_h * scale.to(grad_h.dtype), grad_w * scale.to(grad_w.dtype), None, None, None


# One chunk of GPT-2 logits is CHUNK_ROWS x 50,304 float32 (206 MB at 1024 rows): much larger chunks
# would make the loss, not the blocks' activations, the memory peak of a CPU training step (BENCHMARKS.md).
# A GPU has the memory for larger ones, and runs fewer, larger kernels faster.
CHUNK_ROWS = 1024
GPU_CHUNK_ROWS = 4096


def fused_linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, chunk_rows: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy of `h @ weight.T` (first vocab_size columns) against `targets`, as
    F.cross_entropy computes it: targets equal to IGNORE_INDEX (-100) are not scored, any other
    target outside [0, vocab_size) is an error.

    Without autograd (evaluation), only the loss is computed: no gradient work in the forward pass."""
    h, targets = h.flatten(0, 1), targets.flatten()
    out_of_range = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab_size))
    if out_of_range.any():  # the gather below would silently score another token
        raise IndexError(f"target {targets[out_of_range][0].item()} is out of bounds (vocab_size {vocab_size})")
    chunk_rows = chunk_rows or (GPU_CHUNK_ROWS if h.device.type == "cuda" else CHUNK_ROWS)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return FusedLinearCrossEntropy.apply(h, weight, targets, vocab_size, chunk_rows)
    total, _, _ = loss_and_gradients(h, weight, targets, vocab_size, chunk_rows, with_grads=False)
    return total / (targets != IGNORE_INDEX).sum()
