"""A lineage gains a segment at every start of a run and an exclusion entry whenever the takedown list in
force changes; replacements from every rank are kept in one sorted order, the same on every rank."""

from __future__ import annotations

import dataclasses
import hashlib
from types import SimpleNamespace

import lance
import pyarrow as pa

from svd.curate.config import CurateConfig
from svd.curate.provenance import curation_record, record_curation
from svd.data.buckets import Bucket
from svd.data.exclusion import Exclusion
from svd.data.loader import LoaderState
from svd.data.storage import Storage
from svd.data.table import to_arrow
from svd.train import lineage


def loader(consumed: int, exclusion: Exclusion | None, batch_size: int = 2) -> SimpleNamespace:
    """What `lineage.begin` reads of a ClipLoader."""
    state = LoaderState((consumed,), 7, 3, [[16.0, 16.0, 4.0, 4.0]], "split != 'val'", "abc")
    cfg = SimpleNamespace(table="s3://b/clips.lance", buckets=(Bucket(16, 16, 4, batch_size, fps=4),))
    return SimpleNamespace(cfg=cfg, state=state, exclusion=exclusion)


def begin(previous, step, consumed, exclusion, world_size=2):
    return lineage.begin(
        previous,
        step=step,
        loader=loader(consumed, exclusion),
        world_size=world_size,
        accumulation=1,
        config_yaml="config",
        init_from=None,
        curation={"svd.recipe": "lvd_f"},
    )


def test_each_start_is_a_segment_and_each_change_of_takedown_list_an_entry():
    first = Exclusion("s3://b/takedown-1.txt", frozenset({"a", "b"}), "d1")
    second = Exclusion("s3://b/takedown-2.txt", frozenset({"a", "b", "c"}), "d2")
    history = begin(None, 0, 0, None)
    assert (history["table"], history["table_version"], history["seed"]) == ("s3://b/clips.lance", 3, 7)
    assert history["exclusions"] == []
    history = begin(history, 4, 16, first, world_size=1)
    history = begin(history, 6, 20, first, world_size=3)  # the same list again: nothing new
    history = begin(history, 8, 32, second)
    history = begin(history, 10, 40, None)  # named no list (the trainer carries the last one unless told)
    assert [(s["step"], s["world_size"], s["consumed"]) for s in history["segments"]] == [
        (0, 2, [0]),
        (4, 1, [16]),
        (6, 3, [20]),
        (8, 2, [32]),
        (10, 2, [40]),
    ]
    assert [(e["step"], e["uri"], e["digest"], e["names"]) for e in history["exclusions"]] == [
        (4, first.uri, "d1", 2),
        (8, second.uri, "d2", 3),
        (10, None, None, 0),
    ]
    assert history["segments"][0]["code"]["svd"]
    assert lineage.exclusion_in_force(history) is None  # the last entry names no list
    assert lineage.exclusion_in_force(begin(None, 0, 0, first)) == first.uri  # carried on by the trainer
    assert lineage.exclusion_in_force(None) is None


def test_replacements_from_all_ranks_are_kept_in_one_order():
    history = begin(None, 0, 0, None)
    history = lineage.with_replaced(history, [(0, 9, 30, "corrupt"), (0, 2, 31, "excluded")])
    history = lineage.with_replaced(history, [[0, 5, 29, "corrupt"]])
    assert history["replaced"] == [[0, 2, 31, "excluded"], [0, 5, 29, "corrupt"], [0, 9, 30, "corrupt"]]


def test_the_curation_provenance_a_table_carries_is_recorded(tmp_path):
    metadata = {b"svd.schema_version": b"1", b"svd.curation": b'{"recipe": "lvd_f", "config_sha256": "ab"}'}
    metadata[b"svd.note"] = b"not json"
    metadata[b"other"] = b"ignored"
    table = pa.table({"clip_id": ["a"]}).replace_schema_metadata(metadata)
    dataset = lance.write_dataset(table, str(tmp_path / "clips.lance"))
    assert lineage.curation_provenance(dataset) == {
        "svd.curation": {"recipe": "lvd_f", "config_sha256": "ab"},
        "svd.note": "not json",
    }


def test_the_curation_a_curated_table_records_is_what_the_lineage_records(tmp_path):
    """What curation writes (svd.curate.provenance), read back as a checkpoint's lineage reads it."""
    (tmp_path / "ocr.pt").write_bytes(b"weights")
    (tmp_path / "captioner").mkdir()
    (tmp_path / "captioner" / "model.safetensors").write_bytes(b"caption weights")
    uri = str(tmp_path / "clips.lance")
    lance.write_dataset(to_arrow([]), uri)
    cfg = CurateConfig(input="raw/", output=uri, text_detector=str(tmp_path / "ocr.pt"), recipe="lvd_f.yaml")
    cfg.captioner = str(tmp_path / "captioner")
    record_curation(uri, cfg, Storage.from_env({}))
    found = lineage.curation_provenance(lance.dataset(uri))
    assert list(found) == ["svd.curation"]  # the schema version is left out
    recorded = found["svd.curation"]
    assert recorded["recipe"] == "lvd_f.yaml"
    assert recorded["models_sha256"]["text_detector"] == hashlib.sha256(b"weights").hexdigest()
    assert set(recorded["models_sha256"]) == {"text_detector", "captioner"}  # no latents: no encoder
    assert recorded["config"]["text_detector"] == cfg.text_detector
    # every shard of one curation has the same hash; another setting changes it
    shard = curation_record(dataclasses.replace(cfg, shard="1/4", workers=8), Storage.from_env({}))
    other = curation_record(dataclasses.replace(cfg, min_clip_s=3.0), Storage.from_env({}))
    assert shard["config_sha256"] == recorded["config_sha256"] != other["config_sha256"]
    assert {k: v for k, v in shard.items() if k != "written_at"} == {
        k: v for k, v in recorded.items() if k != "written_at"
    }
