"""Training data: loading, packing into rows, and packed documents behaving exactly like documents run one by one."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM
from deepseek_moe.training.data import (
    byte_tokenizer,
    collate_packed,
    load_documents,
    pack_dataset,
    pack_token_rows,
    resolve_data_files,
)


def test_pack_token_rows_fills_rows_and_restarts_positions() -> None:
    documents = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]]
    rows = list(pack_token_rows(documents, seq_length=4))
    # 10 tokens make two full rows of 4; the last two tokens are dropped. Document 2 is cut by the row boundary and
    # continues as a new segment.
    assert [row["input_ids"] for row in rows] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert [row["position_ids"] for row in rows] == [[0, 1, 2, 0], [0, 1, 2, 3]]
    batch = collate_packed(rows)
    assert batch["labels"].tolist() == [[-100, 2, 3, -100], [-100, 6, 7, 8]]


def test_load_and_pack_text_jsonl_and_parquet(tmp_path) -> None:
    pytest.importorskip("pyarrow")
    import datasets

    texts = ["first document here", "second one", "a third, somewhat longer document"]
    (tmp_path / "a.txt").write_text("\n\n".join(texts) + "\n")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    tokenizer = byte_tokenizer()
    expected = [list(t.encode()) + [tokenizer.eos_token_id] for t in texts]
    stream = [token for document in expected for token in document]
    for source in ("a.txt", "a.jsonl", "a.parquet", "saved"):
        documents = load_documents([str(tmp_path / source)])
        assert documents["text"] == texts, source
        rows = pack_dataset(documents, tokenizer, seq_length=16)
        assert len(rows) == len(stream) // 16
        assert torch.equal(rows[0]["input_ids"], torch.tensor(stream[:16], dtype=torch.int32))
    streamed = pack_dataset(load_documents([str(tmp_path / "a.jsonl")], streaming=True), tokenizer, seq_length=16)
    assert [row["input_ids"] for row in streamed] == [stream[i * 16 : (i + 1) * 16] for i in range(len(stream) // 16)]


def test_data_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        resolve_data_files([str(tmp_path / "missing.jsonl")])
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported data file type"):
        resolve_data_files([str(tmp_path / "x.bin")])
    (tmp_path / "short.txt").write_text("tiny\n")
    with pytest.raises(ValueError, match="fewer than one row"):
        pack_dataset(load_documents([str(tmp_path / "short.txt")]), byte_tokenizer(), seq_length=64)


def test_byte_tokenizer_ids_are_bytes() -> None:
    tokenizer = byte_tokenizer()
    text = "héllo\n\tworld"
    assert tokenizer(text)["input_ids"] == list(text.encode())
    assert tokenizer.decode(list(text.encode())) == text
    assert len(tokenizer) == 259


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_rows_give_per_document_losses(attn_implementation: str) -> None:
    """Documents packed into one row: the same logits per document, and the same LM and MTP (two depths) losses as
    the documents run one by one. With num_items_in_batch=1 every loss is a sum over its targets, so the packed sums
    equal the per-document sums exactly when the packed row has no target that crosses a document boundary."""
    config = DeepseekMoeConfig.from_preset("tiny-v3", num_nextn_predict_layers=2)
    config._attn_implementation = attn_implementation
    model = randomize_(DeepseekMoeForCausalLM(config), seed=3).eval()
    generator = torch.Generator().manual_seed(0)
    lengths = [7, 12, 5, 8]
    documents = [torch.randint(0, config.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    (row,) = pack_token_rows(documents, seq_length=sum(lengths))
    packed = collate_packed([row])
    one = torch.tensor(1)
    with torch.no_grad():
        out = model(**packed, num_items_in_batch=one, use_cache=False)
        alone = [model(torch.tensor([d]), labels=torch.tensor([d]), num_items_in_batch=one) for d in documents]
    start = 0
    for document, result in zip(documents, alone, strict=True):
        logits = out.logits[0, start : start + len(document)]
        torch.testing.assert_close(logits, result.logits[0], rtol=1e-5, atol=1e-5)
        start += len(document)
    lm_sums = [
        F.cross_entropy(r.logits[0, :-1], torch.tensor(d[1:]), reduction="sum")
        for r, d in zip(alone, documents, strict=True)
    ]
    mtp_sum = sum(r.mtp_loss for r in alone)
    torch.testing.assert_close(out.mtp_loss, mtp_sum, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.loss, sum(lm_sums) + config.mtp_loss_weight * mtp_sum, rtol=1e-5, atol=0)
    # Without the boundary masking the packed row would add the MTP targets that lie in the next document.
    with torch.no_grad():
        unmasked = model(packed["input_ids"], labels=packed["input_ids"], num_items_in_batch=one)
    assert unmasked.mtp_loss > out.mtp_loss * 1.05
