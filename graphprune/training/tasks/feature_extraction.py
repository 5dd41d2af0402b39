"""``feature-extraction``: sentence embeddings from a headless encoder, compressed without labels.

An embedding is the encoder's token states pooled as the model's
sentence-transformers files say (mean over real tokens by default), normalised where
they list a Normalize module. With no labels, the dense model is the reference:

- the output distribution of a text is its softmax over cosine similarities to the
  other texts of its batch, at temperature 0.05 (the contrastive view of an
  embedder); the structured search's Fisher and the distillation loss use it, so an
  embedder is pruned and recovered from unlabelled text alone;
- distillation pulls each embedding toward the dense model's by cosine;
- metrics: mean cosine similarity to the dense model's embeddings, and with
  query/document pairs, recall@1, recall@10 and MRR@10 of each query's document among
  all the split's documents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import metrics
from ..task_data import EmbeddingDataset
from .base import Task, device_of, pool

TEMPERATURE = 0.05


class FeatureExtraction(Task):
    name = "feature-extraction"
    head = None
    main_metric = "mrr@10"
    metrics = ("mean_cosine", "recall@1", "recall@10", "mrr@10")
    targets = ()
    dataset_type = EmbeddingDataset

    def __init__(self, pooling: str = "mean", normalize: bool = False):
        self.pooling, self.normalize = pooling, normalize

    def main_metric_for(self, data) -> str:
        return "mrr@10" if getattr(data, "queries", None) else "mean_cosine"

    def collate(self, rows, tokenizer, max_length):
        texts = [row["texts"] if isinstance(row, dict) else row for row in rows]
        return dict(tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt"))

    def embed(self, module, texts: list[str], tokenizer, *, batch_size: int, max_length: int, progress: bool = False, desc: str = "") -> torch.Tensor:
        """Embeddings of ``texts`` (rows in order), pooled as this task's model pools them."""
        device = device_of(module)
        out = []
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress, leave=False):
            batch = self.collate(texts[start : start + batch_size], tokenizer, max_length)
            outputs = module(**{k: v.to(device) for k, v in batch.items()})
            out.append(self.embedding(outputs, batch).detach().float().cpu())
        return torch.cat(out) if out else torch.empty(0)

    def embedding(self, outputs, batch) -> torch.Tensor:
        mask = batch["attention_mask"].to(outputs["last_hidden_state"].device)
        return pool(outputs["last_hidden_state"], mask, self.pooling, self.normalize)

    def evaluate(self, module, data, tokenizer, *, batch_size, max_length, reference=None, progress=True, name=""):
        if len(data) == 0 and not data.queries:
            raise ValueError(f"evaluate: dataset {name!r} is empty")
        options = {"batch_size": batch_size, "max_length": max_length, "progress": progress}
        result = {}
        if reference is not None and len(data):
            ours = self.embed(module, data.texts, tokenizer, desc=f"embed {name}", **options)
            dense = self.embed(reference, data.texts, tokenizer, desc=f"embed {name} (dense)", **options)
            result["mean_cosine"] = metrics.mean_cosine(ours, dense)
        if data.queries:
            queries = self.embed(module, data.queries, tokenizer, desc=f"queries {name}", **options)
            documents = self.embed(module, data.documents, tokenizer, desc=f"documents {name}", **options)
            result.update(metrics.retrieval_metrics(queries, documents))
        if not result:
            raise ValueError(
                f"evaluate: {name!r} has no query/document pairs, and mean cosine needs the dense model: "
                "pass reference=dense_graph"
            )
        return {**result, "examples": len(data.queries) or len(data)}

    def distributions(self, outputs, batch):
        e = F.normalize(self.embedding(outputs, batch), dim=-1)
        similarity = e @ e.T / TEMPERATURE
        # a text is not its own neighbour; a large negative (not -inf) keeps the KL finite
        similarity = similarity - 1e4 * torch.eye(len(e), device=e.device, dtype=e.dtype)
        log_p = torch.log_softmax(similarity, -1)[:, None, :]
        return [(log_p, torch.ones(len(e), 1, dtype=torch.bool, device=e.device))]

    def distillation_loss(self, student, teacher, batch, temperature):
        """1 - cosine between each text's embedding and the dense model's, averaged (``temperature`` is unused)."""
        return (1 - F.cosine_similarity(self.embedding(student, batch), self.embedding(teacher, batch).detach(), dim=-1)).mean()
