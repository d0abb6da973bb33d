"""ROUGE-1/2/L/Lsum F-measures as an `evaluate` module wrapping Google's rouge_score, shipped with peftlab (offline)."""

import re

import datasets
import evaluate
import numpy as np
from rouge_score import rouge_scorer, tokenizers

_DESCRIPTION = ("ROUGE F-measures (0-1) with rouge_score's tokenizer and Porter stemming. rougeLsum is the summary-level LCS over "
                "sentences given one per line: texts are split into sentences at newlines and after . ! ? first.")
_KWARGS = ("predictions: list of str; references: list of str, or of lists of str (several references per prediction: "
           "each key's best F-measure over them, rouge_score's score_multi); rouge_types: default rouge1, rouge2, rougeL, "
           "rougeLsum; use_stemmer: default True; "
           "split_sentences: put each sentence on its own line for rougeLsum (default True); use_aggregator: mean over rows "
           "(default True) or per-row lists.")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences_per_line(text):
    # rouge_score's rougeLsum reads sentences as lines; a summary on one line would make Lsum equal plain rougeL
    return "\n".join(s.strip() for line in text.splitlines() for s in _SENTENCE_END.split(line) if s.strip())


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=[datasets.Features({"predictions": datasets.Value("string"),
                                         "references": datasets.Sequence(datasets.Value("string"))}),
                      datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")})],
        )

    def _compute(self, predictions, references, rouge_types=None, use_stemmer=True, split_sentences=True, use_aggregator=True):
        rouge_types = list(rouge_types or ["rouge1", "rouge2", "rougeL", "rougeLsum"])
        scorer = rouge_scorer.RougeScorer(rouge_types, use_stemmer=use_stemmer, tokenizer=tokenizers.DefaultTokenizer(use_stemmer))
        references = [[r] if isinstance(r, str) else list(r) for r in references]
        if split_sentences:
            predictions = [sentences_per_line(p) for p in predictions]
            references = [[sentences_per_line(r) for r in rs] for rs in references]
        scores = [scorer.score_multi(rs, p) for p, rs in zip(predictions, references)]  # each key: the best reference's
        per_row = {t: [s[t].fmeasure for s in scores] for t in rouge_types}
        if not use_aggregator:
            return per_row
        return {t: float(np.mean(v)) if v else 0.0 for t, v in per_row.items()}
