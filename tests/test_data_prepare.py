"""Synthetic videos → prepare → records: frame sampling, bad videos skipped with reasons, resuming adds nothing
twice, and the pipeline reads back every prepared clip."""

import json
import os

import numpy as np
import pytest

from configs import tiny
from hyvideo_jax.data import pipeline, prepare, synthetic
from hyvideo_jax.data.pipeline import ArrayRecordClipSource, DataConfig, make_train_pipeline


def scene(i):
    return synthetic.random_scene(np.random.default_rng([0, i]))


def to_unit(video):
    return video.astype(np.float32) / 127.5 - 1.0


def test_frame_sampling_at_target_fps(tmp_path):
    video = synthetic.render(scene(0), 10, 32, 32)
    config = prepare.PrepareConfig(fps=8.0, buckets=((5, 32, 32), (5, 16, 32)))
    # A 16 fps source sampled at 8 fps keeps every other frame; H.264 at crf 16 keeps pixels within a few levels.
    path = str(tmp_path / "fast.mp4")
    synthetic.write_mp4(path, video, 16.0)
    clip, fps = prepare.decode_clip(path, config)
    assert fps == 16.0 and clip.shape == (5, 32, 32, 3)
    error_kept = np.abs(clip - to_unit(video[[0, 2, 4, 6, 8]])).mean()
    error_consecutive = np.abs(clip - to_unit(video[:5])).mean()
    assert error_kept < 0.03 < error_consecutive
    # A 48x80 frame goes to the 16x32 bucket (aspect 2 is closer to 1.67 than 1 is), resized then centre-cropped.
    synthetic.write_mp4(str(tmp_path / "wide.mp4"), synthetic.render(scene(1), 5, 48, 80), 8.0)
    assert prepare.decode_clip(str(tmp_path / "wide.mp4"), config)[0].shape == (5, 16, 32, 3)
    assert prepare.choose_size(48, 80, config.buckets) == (16, 32)
    assert prepare.choose_size(40, 40, config.buckets) == (32, 32)


def test_probe_gives_the_decoded_shape_without_pixels(tmp_path):
    """probe_clip (frame times only) names the shape decode_clip produces, or raises its SkipVideo, for sources of
    other frame rates, lengths and aspect ratios; and costs less."""
    import time

    config = prepare.PrepareConfig(fps=8.0, buckets=((5, 32, 32), (9, 32, 32), (13, 32, 32), (5, 16, 32)))
    cases = [(16.0, 21, 32, 32), (24.0, 40, 48, 80), (5.0, 9, 64, 64), (8.0, 12, 32, 48), (30.0, 17, 40, 40),
             (12.5, 30, 32, 32), (8.0, 3, 32, 32), (4.0, 3, 32, 32)]
    paths = []
    for i, (fps, frames, height, width) in enumerate(cases):
        paths.append(str(tmp_path / f"v{i}.mp4"))
        synthetic.write_mp4(paths[-1], synthetic.render(scene(i), frames, height, width), fps)
    paths.append(str(tmp_path / "broken.mp4"))
    with open(paths[-1], "wb") as f:
        f.write(np.random.default_rng(0).bytes(4000))

    def outcome(fn, path):
        try:
            return tuple(fn(path))
        except prepare.SkipVideo as e:
            return str(e)

    start = time.perf_counter()
    decoded = [outcome(lambda p: prepare.decode_clip(p, config)[0].shape[:3], p) for p in paths]
    decode_seconds, start = time.perf_counter() - start, time.perf_counter()
    probed = [outcome(lambda p: prepare.probe_clip(p, config), p) for p in paths]
    probe_seconds = time.perf_counter() - start
    print(f"decoded shapes {decoded}; probe {probe_seconds:.3f} s, decode {decode_seconds:.3f} s")
    assert probed == decoded
    # Every branch is covered: buckets of each length and both sizes, too short, unreadable.
    assert {d[0] for d in decoded if isinstance(d, tuple)} == {5, 9, 13} and (5, 16, 32) in decoded
    assert any(str(d).startswith("too short") for d in decoded)
    assert any(str(d).startswith("unreadable") for d in decoded)


def make_folder(folder, indices):
    """Good synthetic videos `indices`, a corrupt file, a too-short video and an uncaptioned one."""
    os.makedirs(folder, exist_ok=True)
    lines = []
    for i in indices:
        name = f"video-{i:05d}.mp4"
        synthetic.write_mp4(os.path.join(folder, name), synthetic.render(scene(i), 6 + i % 4, 32, 32 + 16 * (i % 2)),
                            8.0)
        lines.append(json.dumps({"video": name, "caption": scene(i).caption}))
    with open(os.path.join(folder, "broken.mp4"), "wb") as f:
        f.write(np.random.default_rng(0).bytes(4000))
    synthetic.write_mp4(os.path.join(folder, "short.mp4"), synthetic.render(scene(9), 3, 32, 32), 8.0)
    synthetic.write_mp4(os.path.join(folder, "uncaptioned.mp4"), synthetic.render(scene(8), 6, 32, 32), 8.0)
    lines += [json.dumps({"video": n, "caption": "a thing"}) for n in ("broken.mp4", "short.mp4")]
    with open(os.path.join(folder, "captions.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def config():
    config = tiny.get_config()
    config.data.prepare.records_per_shard = 2
    config.data.source, config.data.path = "arrayrecord", "unused"
    config.text.text_len = config.text.clip_len = config.data.text_len = 80  # whole captions (one token a byte)
    return config


@pytest.fixture(scope="module")
def encoder(config):
    return prepare.ClipEncoder(config)


def test_prepare_skips_bad_videos_and_resumes_without_duplicates(tmp_path, config, encoder):
    videos, out = str(tmp_path / "videos"), str(tmp_path / "clips")
    make_folder(videos, range(3))
    captions = os.path.join(videos, "captions.jsonl")
    first = prepare.prepare_videos(videos, captions, out, config, progress=False, encoder=encoder)
    reasons = {s["video"]: s["reason"] for s in first["skipped"]}
    assert (first["videos"], first["written"], first["already_prepared"]) == (6, 3, 0)
    assert sorted(reasons) == ["broken.mp4", "short.mp4", "uncaptioned.mp4"]
    assert reasons["broken.mp4"].startswith("unreadable video (InvalidDataError")
    assert reasons["short.mp4"] == "too short: 3 frames at 8 fps, the shortest 32x32 bucket needs 5"
    assert reasons["uncaptioned.mp4"] == "no caption in captions.jsonl"
    with open(os.path.join(out, prepare.SUMMARY)) as f:
        assert json.load(f) == first
    manifest = pipeline.read_manifest(out)
    assert [s["records"] for s in manifest["shards"]] == [2, 1]
    # Clips are encoded in batches of one bucket: videos 0 and 2 (32x32) fill the first shard, video 1 (16x32) follows.
    assert [sid for s in manifest["shards"] for sid in s["source_ids"]] == [f"video-0000{i}.mp4" for i in (0, 2, 1)]

    # The records hold the VAE latents of the decoded clip and the text states of its caption.
    source = ArrayRecordClipSource(out)
    for record, index in enumerate((0, 2, 1)):
        clip = source[record]
        name = f"video-{index:05d}.mp4"
        video, _ = prepare.decode_clip(os.path.join(videos, name), prepare.PrepareConfig.from_config(
            config.data.prepare))
        latents, states, mask, pooled = encoder.encode([video], [scene(index).caption])
        assert clip.caption == scene(index).caption and clip.source_id == name
        # 32x48 sources are closer in aspect to the 16x32 bucket than to 32x32
        assert (clip.num_frames, clip.height, clip.width, clip.fps) == (5, 32 - 16 * (index % 2), 32, 8.0)
        assert clip.latents.shape == (2, 4 - 2 * (index % 2), 4, 4)
        assert clip.text_mask.sum() == len(clip.caption) + 1  # byte tokens + <|eot_id|>
        np.testing.assert_allclose(clip.latents.astype(np.float32), latents[0], rtol=1e-2, atol=1e-2)
        np.testing.assert_array_equal(clip.text_states, states[0])
        np.testing.assert_array_equal(clip.text_mask, mask[0])
        np.testing.assert_array_equal(clip.pooled_text, pooled[0])

    # The empty prompt's encoding, stored once for caption dropout, is what the text encoders give for "".
    null = pipeline.read_null_text(out)
    empty = [np.asarray(a)[0] for a in encoder.text.encode_prompts([""])]
    np.testing.assert_array_equal(null["text_mask"], empty[1])
    for key, want in (("text_states", empty[0]), ("pooled_text", empty[2])):
        np.testing.assert_array_equal(null[key], want.astype(source[0].text_states.dtype).astype(np.float32))
    assert null["text_mask"].sum() == 1                   # only <|eot_id|>

    # Second run: nothing new, manifest unchanged, the same bad videos reported again.
    before = open(os.path.join(out, pipeline.MANIFEST)).read()
    second = prepare.prepare_videos(videos, captions, out, config, progress=False, encoder=encoder)
    assert (second["written"], second["already_prepared"], second["records_total"]) == (0, 3, 3)
    assert second["skipped"] == first["skipped"]
    assert open(os.path.join(out, pipeline.MANIFEST)).read() == before

    # A run stopped mid-shard left an unlisted partial shard; two more videos arrive: only they are written, and
    # the partial shard is overwritten.
    with open(os.path.join(out, "clips-00002.array_record"), "wb") as f:
        f.write(b"partial shard of a stopped run")
    make_folder(videos, range(5))
    third = prepare.prepare_videos(videos, captions, out, config, progress=False, encoder=encoder)
    assert (third["written"], third["already_prepared"], third["records_total"]) == (2, 3, 5)
    ids = [sid for s in pipeline.read_manifest(out)["shards"] for sid in s["source_ids"]]
    assert sorted(ids) == [f"video-0000{i}.mp4" for i in range(5)] and len(ids) == 5

    # The pipeline reads all five clips exactly once per epoch.
    data = DataConfig.from_config({**config.data.to_dict(), "path": out, "global_batch_size": 2})
    it = make_train_pipeline(data, 0, 1, seed=0)
    batches = [next(it) for _ in range(pipeline.steps_per_epoch(data))]
    seen = np.concatenate([b["record_index"][b["valid"]] for b in batches])
    assert sorted(seen.tolist()) == [0, 1, 2, 3, 4]
    assert {b["latents"].shape[1:] for b in batches} == {(2, 4, 4, 4), (2, 2, 4, 4)}


def test_synthetic_dataset_is_deterministic(tmp_path):
    config = dict(num_videos=3, sizes=((32, 32),), frames=(5,), fps=8.0, seed=3)
    path = synthetic.write_dataset(str(tmp_path / "a"), config)
    lines = [json.loads(line) for line in open(path)]
    assert [entry["video"] for entry in lines] == ["video-00000.mp4", "video-00001.mp4", "video-00002.mp4"]
    scenes = [synthetic.random_scene(np.random.default_rng([3, i])) for i in range(3)]
    assert [entry["caption"] for entry in lines] == [s.caption for s in scenes]
    # The decoded frames match the rendering (lossy H.264: mean error under 2% of the range).
    clip, _ = prepare.decode_clip(str(tmp_path / "a" / "video-00001.mp4"),
                                  prepare.PrepareConfig(fps=8.0, buckets=((5, 32, 32),)))
    rng = np.random.default_rng([3, 1])
    synthetic.random_scene(rng)  # the scene draws come first, then the offset, as in write_dataset
    rendered = synthetic.render(scenes[1], 5, 32, 32, float(rng.uniform(-0.3, 0.3)))
    assert np.abs(clip - to_unit(rendered)).mean() < 0.04
    # A moving shape: consecutive frames differ.
    assert np.abs(np.diff(rendered.astype(np.float32), axis=0)).mean() > 0.5


def test_synthetic_split_by_combination(tmp_path):
    """`exclude` keeps (shape, colour, direction) combinations out; `combinations` shows only them, cycled; the
    videos are the seed's, and names outside the vocabulary are refused with the field's name."""
    held_out = (("circle", "red", "left"), ("square", "blue", "up"))
    training = synthetic.SyntheticConfig(num_videos=200, sizes=((32, 32),), frames=(5,), exclude=held_out)
    scenes = [synthetic.scene_of(training, i)[0] for i in range(200)]
    combinations = {s.combination for s in scenes}
    assert not combinations & set(held_out) and len(combinations) > 50   # of the 70 left
    # Scenes that were allowed before are drawn as before: excluding only redraws the excluded ones.
    free = synthetic.SyntheticConfig(num_videos=200, sizes=((32, 32),), frames=(5,))
    same = [synthetic.scene_of(free, i)[0] for i in range(200)]
    assert all(a == b for a, b in zip(scenes, same) if b.combination not in held_out)
    assert sum(b.combination in held_out for b in same) > 0
    only = dict(num_videos=5, sizes=((32, 32),), frames=(5,), combinations=held_out, seed=1)
    path = synthetic.write_dataset(str(tmp_path / "held_out"), only)
    captions = [json.loads(line)["caption"] for line in open(path)]
    words = [c.split() for c in captions]   # "a <size> <colour> <shape> moving <direction> <speed> on a ..."
    assert [(w[3], w[2], w[5]) for w in words] == [*held_out, *held_out, held_out[0]]
    # Sizes, speeds and backgrounds drawn from given names only; the captions still name them.
    plain = synthetic.SyntheticConfig(num_videos=40, shape_sizes=("large",), speeds=("quickly",),
                                      backgrounds=("black",), exclude=held_out)
    drawn = [synthetic.scene_of(plain, i)[0] for i in range(40)]
    assert {(s.size, s.speed, s.background) for s in drawn} == {("large", "quickly", "black")}
    assert len({s.combination for s in drawn}) > 20 and not {s.combination for s in drawn} & set(held_out)
    assert drawn[0].caption.startswith("a large ") and drawn[0].caption.endswith(" quickly on a black background")
    with pytest.raises(ValueError, match=r"data.synthetic.backgrounds: \['pink'\] are not among"):
        synthetic.SyntheticConfig(backgrounds=("pink",))
    with pytest.raises(ValueError, match=r"data.synthetic.exclude: each entry must be \(shape, colour, direction\)"):
        synthetic.SyntheticConfig(exclude=(("circle", "pink", "left"),))
    with pytest.raises(ValueError, match="data.synthetic.combinations: .* also in data.synthetic.exclude"):
        synthetic.SyntheticConfig(exclude=held_out, combinations=held_out[:1])


def test_synthetic_stills_show_their_scene_at_drawn_times(tmp_path):
    """One-frame videos (stills) show the scene at a time of its motion drawn from (seed, i), not all at its start:
    the VAE's stills cover every position its clips pass through."""
    config = synthetic.SyntheticConfig(num_videos=6, sizes=((32, 32),), frames=(1,), seed=4)
    synthetic.write_dataset(str(tmp_path / "stills"), config)
    moved = 0
    for i in range(6):
        still, _ = prepare.decode_clip(str(tmp_path / "stills" / f"video-{i:05d}.mp4"),
                                       prepare.PrepareConfig(fps=8.0, buckets=((1, 32, 32),)))
        scene, offset = synthetic.scene_of(config, i)
        at = float(np.random.default_rng([4, i, 1]).uniform())
        assert still.shape == (1, 32, 32, 3)
        assert np.abs(still - to_unit(synthetic.render(scene, 1, 32, 32, offset, at))).mean() < 0.04
        start = synthetic.render(scene, 1, 32, 32, offset)
        moved += np.abs(still - to_unit(start)).mean() > 0.01
    assert moved >= 4
