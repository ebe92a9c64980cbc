"""The Familiarity Network f_mu (paper 4.1b, eq. 6 and 9; threshold A.5).

A K-way classifier trained to memorise RANDOM labels of the edit queries' (frozen, tuned) encoder embeddings:
what it has seen (and its neighbourhood, e.g. paraphrases) gets a low-entropy output, unseen (unrelated)
queries a high-entropy one, so ``entropy < threshold`` routes a query to the generated neuron.

``negatives`` (this project's addition, off in the paper's hparams): embeddings of prompts known to be
unrelated to the edits (drawn from a data file disjoint from them, as A.3's pseudo-irrelevant prompts) are
trained toward the uniform distribution, i.e. maximal entropy (outlier exposure). A random-label classifier
alone gives low entropy to anything near the edits in embedding space, e.g. another subject with the same
relation (CounterFact's neighbourhood prompts); the negatives teach it where "unrelated" begins.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from meg_harness.errors import HarnessError

NUM_CLASSES = 10  # K (4.1b: "we adopt K = 10")
N_BLOCKS = 5  # 4.1b: "5 FFN blocks of fully connected layer followed by a final classification head layer"
HIDDEN = 1024  # not given by the paper; on CounterFact dev, wider separated paraphrases from unrelated better
DEFAULT_THRESHOLD = 0.1  # epsilon, in nats (A.5: 0.1 for Phi-2 on ZsRE)
WEIGHTS_FILE = "familiarity.safetensors"
CONFIG_FILE = "familiarity.json"


class FamiliarityNetwork(nn.Module):
    """``n_blocks`` x (Linear + ReLU) then a Linear head to ``num_classes`` logits.

    ``normalize`` L2-normalises the input embedding first (the encoder is tuned for cosine similarity, so the
    direction is what carries meaning); weights are initialised from ``seed``.
    """

    def __init__(
        self,
        in_dim: int,
        *,
        hidden: int = HIDDEN,
        n_blocks: int = N_BLOCKS,
        num_classes: int = NUM_CLASSES,
        normalize: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if in_dim < 1 or hidden < 1 or n_blocks < 1 or num_classes < 2:
            raise HarnessError(
                f"bad familiarity network shape: in_dim={in_dim} hidden={hidden} n_blocks={n_blocks} "
                f"num_classes={num_classes}"
            )
        self.config: dict[str, Any] = {
            "in_dim": in_dim,
            "hidden": hidden,
            "n_blocks": n_blocks,
            "num_classes": num_classes,
            "normalize": normalize,
            "seed": seed,
        }
        self.train_info: dict[str, Any] = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers: list[nn.Module] = []
            for i in range(n_blocks):
                layers += [nn.Linear(in_dim if i == 0 else hidden, hidden), nn.ReLU()]
            self.blocks = nn.Sequential(*layers)
            self.head = nn.Linear(hidden, num_classes)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, K]``."""
        x = embeddings.to(self.device, self.head.weight.dtype)
        if self.config["normalize"]:
            x = F.normalize(x, dim=-1)
        return self.head(self.blocks(x))

    @torch.no_grad()
    def log_probs(self, embeddings: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """``log P_mu`` ``[n, K]`` in eval mode, on the input's device."""
        self._check(embeddings)
        was_training = self.training
        self.eval()
        try:
            out = [
                F.log_softmax(self(embeddings[i : i + chunk]).float(), dim=-1)
                for i in range(0, len(embeddings), chunk)
            ]
        finally:
            self.train(was_training)
        return (torch.cat(out) if out else torch.empty(0, self.config["num_classes"])).to(embeddings.device)

    def entropy(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Eq. 9, ``H = -sum_k P^k log P^k`` in nats (natural log), ``[n]``; between 0 and ``log K``."""
        log_p = self.log_probs(embeddings)
        return (-(log_p.exp() * log_p).sum(dim=-1)).clamp_min(0.0)

    def route(self, embeddings: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
        """Bool ``[n]``: True where ``H < threshold`` (eq. 10: the query gets the generated neuron)."""
        return self.entropy(embeddings) < threshold

    def fit(
        self,
        embeddings: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        negatives: torch.Tensor | None = None,
        negative_weight: float = 1.0,
        seed: int = 0,
        lr: float = 1e-3,
        batch_size: int = 256,
        max_epochs: int = 1000,
        loss_tol: float = 1e-4,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Train with cross-entropy (eq. 6) on random labels in ``[0, K)`` (drawn from ``seed`` unless given)
        until the train accuracy is 100% and the mean train loss is below ``loss_tol``, or ``max_epochs``.

        With ``negatives``, each step also draws ``batch_size`` of them and adds ``negative_weight`` times
        their cross-entropy to the uniform distribution. Adam, shuffled mini-batches. Returns (and keeps in
        ``train_info``) epochs, final loss and accuracy on the edits, and the negatives' mean entropy.
        """
        from tqdm.auto import tqdm

        self._check(embeddings)
        n = len(embeddings)
        if n == 0:
            raise HarnessError("the familiarity network needs at least one edit embedding to train on")
        generator = torch.Generator().manual_seed(seed)
        if labels is None:
            labels = torch.randint(0, self.config["num_classes"], (n,), generator=generator)
        elif labels.shape != (n,) or labels.min() < 0 or labels.max() >= self.config["num_classes"]:
            raise HarnessError(f"labels must be {n} class ids in [0, {self.config['num_classes']})")
        x, y = embeddings.detach().to(self.device, torch.float32), labels.to(self.device)
        if negatives is not None:
            self._check(negatives)
            negatives = negatives.detach().to(self.device, torch.float32)
        use_negatives = negatives is not None and len(negatives) > 0 and negative_weight > 0
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        loss, acc, epochs = float("inf"), 0.0, 0
        bar = tqdm(range(1, max_epochs + 1), desc="familiarity net", disable=not progress)
        for epochs in bar:  # noqa: B007 (the count is reported)
            self.train()
            for idx in torch.randperm(n, generator=generator).split(batch_size):
                idx = idx.to(self.device)
                batch_loss = F.cross_entropy(self(x[idx]), y[idx])
                if use_negatives:
                    drawn = torch.randint(0, len(negatives), (batch_size,), generator=generator)
                    to_uniform = -F.log_softmax(self(negatives[drawn.to(self.device)]), dim=-1).mean()
                    batch_loss = batch_loss + negative_weight * to_uniform
                optimizer.zero_grad(set_to_none=True)
                batch_loss.backward()
                optimizer.step()
            log_p = self.log_probs(x)
            loss = float(F.nll_loss(log_p, y))
            acc = 100.0 * float((log_p.argmax(-1) == y).float().mean())
            bar.set_postfix(loss=f"{loss:.2e}", acc=f"{acc:.1f}")
            if acc == 100.0 and loss < loss_tol:
                break
        bar.close()
        self.eval()
        self.train_info = {
            "n": n,
            "epochs": epochs,
            "loss": loss,
            "accuracy": acc,
            "converged": acc == 100.0 and loss < loss_tol,
            "negatives": len(negatives) if use_negatives else 0,
            "negatives_mean_entropy": float(self.entropy(negatives).mean()) if use_negatives else None,
            "negative_weight": negative_weight if use_negatives else None,
            "seed": seed,
            "lr": lr,
            "batch_size": batch_size,
            "max_epochs": max_epochs,
            "loss_tol": loss_tol,
        }
        return self.train_info

    def save(self, directory: str | Path) -> Path:
        """Write ``familiarity.safetensors`` and ``familiarity.json`` (shape config and training info)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE))
        meta = {"config": self.config, "train_info": self.train_info}
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> FamiliarityNetwork:
        """Inverse of :meth:`save`."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not config_path.is_file() or not weights_path.is_file():
            raise HarnessError(
                f"not a saved familiarity network (needs {CONFIG_FILE} and {WEIGHTS_FILE})", file=directory
            )
        meta = json.loads(config_path.read_text(encoding="utf-8"))
        net = cls(**meta["config"])
        net.load_state_dict(load_file(str(weights_path)))
        net.train_info = meta.get("train_info", {})
        return net.to(device).eval()

    def _check(self, embeddings: torch.Tensor) -> None:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.config["in_dim"]:
            raise HarnessError(
                f"expected embeddings of shape [n, {self.config['in_dim']}], got {list(embeddings.shape)}"
            )


def train_familiarity(
    edit_embeddings: torch.Tensor, *, seed: int = 0, progress: bool = True, **kwargs: Any
) -> FamiliarityNetwork:
    """Build a :class:`FamiliarityNetwork` for ``edit_embeddings`` (shape keywords: hidden, n_blocks,
    num_classes, normalize) and :meth:`~FamiliarityNetwork.fit` it (training keywords: lr, batch_size,
    max_epochs, loss_tol, labels, negatives, negative_weight)."""
    shape_keys = {"hidden", "n_blocks", "num_classes", "normalize"}
    shape = {k: kwargs.pop(k) for k in list(kwargs) if k in shape_keys}
    net = FamiliarityNetwork(edit_embeddings.shape[-1], seed=seed, **shape).to(edit_embeddings.device)
    net.fit(edit_embeddings, seed=seed, progress=progress, **kwargs)
    return net
