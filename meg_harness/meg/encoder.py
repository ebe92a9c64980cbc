"""The MeG text encoder f_TE (paper 4.1a): a BERT-family encoder; its [CLS] output represents a query."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from meg_harness.errors import HarnessError
from meg_harness.models.minilm import MINILM_PACKAGE, minilm_path  # noqa: F401  (re-exported)

BERT_BASE_HUB_ID = "bert-base-uncased"  # the paper's encoder (4.1a: "a pre-trained BERT")
ENCODER_META = "text_encoder.json"
DEFAULT_MAX_LENGTH = 128


class TextEncoder(nn.Module):
    """A transformers ``AutoModel`` and its tokenizer; a text's representation is ``last_hidden_state[:, 0]``.

    ``name`` identifies the base model (for logs); ``info`` holds provenance that :meth:`save` keeps (tuning
    hyper-parameters, losses); ``from_cache`` is set by :func:`~meg_harness.meg.tuning.tune_encoder` when the
    tuned weights were read back from its disk cache instead of being trained.
    """

    def __init__(
        self, model: nn.Module, tokenizer, *, name: str, max_length: int = DEFAULT_MAX_LENGTH
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.max_length = max_length
        self.info: dict = {}  # provenance (e.g. tuning hyper-parameters); saved with the encoder
        self.from_cache = False

    @property
    def dim(self) -> int:
        """Width of the embedding (the model's hidden size)."""
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """[CLS] embeddings ``[len(texts), dim]`` of one batch, with gradients (used for tuning)."""
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        return self.model(**batch).last_hidden_state[:, 0]

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """[CLS] embeddings ``[n, dim]`` (float32, CPU) in eval mode; deterministic for a given batch size."""
        from tqdm.auto import tqdm

        texts = list(texts)
        if not texts:
            return torch.empty(0, self.dim)
        was_training = self.training
        self.eval()
        try:
            chunks = [
                self(texts[i : i + batch_size]).float().cpu()
                for i in tqdm(range(0, len(texts), batch_size), desc="encode", disable=not progress)
            ]
        finally:
            self.train(was_training)
        return torch.cat(chunks)

    def fingerprint(self) -> str:
        """sha256 of the weights and the tokenizer: a cache key that changes whenever either does."""
        digest = hashlib.sha256()
        for key, tensor in sorted(self.model.state_dict().items()):
            digest.update(key.encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        vocab = (
            backend.to_str()
            if backend is not None
            else json.dumps(self.tokenizer.get_vocab(), sort_keys=True)
        )
        digest.update(vocab.encode())
        digest.update(str(self.max_length).encode())
        return digest.hexdigest()

    def save(self, directory: str | Path) -> Path:
        """Write the model (safetensors), the tokenizer and ``text_encoder.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        meta = {"name": self.name, "max_length": self.max_length, "info": self.info}
        (directory / ENCODER_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, max_length: int | None = None) -> TextEncoder:
        """Load what :meth:`save` wrote (or any local transformers encoder folder); ``max_length`` overrides
        the saved one."""
        directory = Path(directory)
        meta_path = directory / ENCODER_META
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
        model, tokenizer = _load_auto(str(directory))
        length = max_length or int(meta.get("max_length", DEFAULT_MAX_LENGTH))
        encoder = cls(model, tokenizer, name=meta.get("name", str(directory)), max_length=length)
        encoder.info = dict(meta.get("info", {}))
        return encoder


def load_text_encoder(
    name_or_path: str | Path | None = None, *, max_length: int | None = None
) -> TextEncoder:
    """``None``/``"minilm"``: all-MiniLM-L6-v2 from its PyPI package (the CPU reference); ``"bert-base"``: the
    paper's ``bert-base-uncased`` from the hub; otherwise a local folder (e.g. one :meth:`TextEncoder.save`
    wrote) or a hub id."""
    if name_or_path is None or str(name_or_path) == "minilm":
        source, name = str(minilm_path()), "all-MiniLM-L6-v2"
    elif str(name_or_path) == "bert-base":
        source = name = BERT_BASE_HUB_ID
    else:
        source = name = str(name_or_path)
        if Path(source).is_dir():
            return TextEncoder.from_pretrained(source, max_length)
    model, tokenizer = _load_auto(source)
    return TextEncoder(model, tokenizer, name=name, max_length=max_length or DEFAULT_MAX_LENGTH)


def _load_auto(source: str):
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModel.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise HarnessError(
            f"cannot load a text encoder from {source!r} (not a transformers encoder folder, or a hub id "
            f"that cannot be reached): {exc}",
            file=source,
        ) from None
    model.eval()
    return model, tokenizer


@torch.no_grad()
def retrieval_accuracy(
    encoder: TextEncoder, originals: Sequence[str], paraphrases: Sequence[str], batch_size: int = 64
) -> float:
    """Top-1 accuracy (percent) of retrieving each paraphrase's original among all originals (cosine).

    ``paraphrases[i]`` belongs to ``originals[i]``; a hit on an identical duplicate of the original counts.
    """
    if len(originals) != len(paraphrases):
        raise HarnessError(f"{len(originals)} originals but {len(paraphrases)} paraphrases")
    if not originals:
        raise HarnessError("retrieval accuracy needs at least one (original, paraphrase) pair")
    keys, queries = encoder.encode(originals, batch_size), encoder.encode(paraphrases, batch_size)
    return retrieval_accuracy_from_embeddings(keys, queries, originals)


@torch.no_grad()
def retrieval_accuracy_from_embeddings(
    original_emb: torch.Tensor, paraphrase_emb: torch.Tensor, originals: Sequence[str] | None = None
) -> float:
    """:func:`retrieval_accuracy` on precomputed embeddings (row i of both belongs together); with
    ``originals`` given, retrieving an identical duplicate text of the original counts as a hit."""
    if original_emb.shape != paraphrase_emb.shape or not len(original_emb):
        raise HarnessError(
            f"embedding shapes differ or are empty: {list(original_emb.shape)} vs "
            f"{list(paraphrase_emb.shape)}"
        )
    keys = nn.functional.normalize(original_emb.float(), dim=-1)
    queries = nn.functional.normalize(paraphrase_emb.float(), dim=-1)
    best = (queries @ keys.T).argmax(dim=-1).tolist()
    if originals is None:
        hits = sum(i == j for i, j in enumerate(best))
    else:
        hits = sum(originals[j] == originals[i] for i, j in enumerate(best))
    return 100.0 * hits / len(best)


def make_tiny_text_encoder(
    corpus: Sequence[str] | None = None, *, seed: int = 0, hidden: int = 32, init_range: float = 0.1
) -> TextEncoder:
    """A tiny random BERT (2 layers) with a WordPiece tokenizer built offline from ``corpus`` (default: the
    package's tiny corpus), for tests and CPU smoke runs. No dropout, and ``init_range`` above BERT's 0.02:
    the random model's [CLS] output differs little between texts, and so it learns in a few steps. The same
    arguments give the same encoder in every process (vocabulary and weights)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    if corpus is None:
        from meg_harness.models.tiny import tiny_corpus

        corpus = tiny_corpus().splitlines()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = [
        word for line in corpus for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line))
    ]
    tok = Tokenizer(models.WordPiece(_ordered_wordpiece_vocab(words, specials), unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.decoder = decoders.WordPiece()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=DEFAULT_MAX_LENGTH,
        pad_token_id=tok.token_to_id("[PAD]"),
        initializer_range=init_range,
        hidden_dropout_prob=0.0,  # the tiny model's text signal is weak: dropout noise would swamp it
        attention_probs_dropout_prob=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    model.eval()
    return TextEncoder(model, tokenizer, name=f"tiny-bert-{hidden}-seed{seed}")


def _ordered_wordpiece_vocab(words: list[str], specials: list[str], size: int = 1000) -> dict[str, int]:
    """A WordPiece vocabulary in a fixed order: the special tokens, every character of ``words`` alone and
    as a continuation (sorted), then the words by frequency (ties alphabetical) up to ``size`` tokens.
    tokenizers' ``WordPieceTrainer`` numbers continuation pieces in hash-map order, so its vocabulary (and
    with it a seeded model's embedding of each word) differs between processes (tokenizers issue 1794)."""
    from collections import Counter

    counts = Counter(words)
    chars = sorted({char for word in counts for char in word})
    tokens = [*specials, *chars, *(f"##{char}" for char in chars)]
    frequent = sorted((word for word in counts if len(word) > 1), key=lambda word: (-counts[word], word))
    tokens += frequent[: max(0, size - len(tokens))]
    return {token: index for index, token in enumerate(tokens)}
