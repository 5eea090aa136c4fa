from segdist.bench.evaluation import benchmark


def test_benchmark_reports_the_three_timings():
    out = benchmark(size=(20, 26), images=1, depth=18, width=4, tile_size=16, scales=(0.5, 1.0))
    for key in ("whole_image_s_per_image", "msf_s_per_image", "crf_s_per_image"):
        assert out[key]["median"] > 0
    # scale 0.5 (10x13): one padded tile; scale 1 (20x26): 2 x 2 tiles; each run mirrored too
    assert out["msf"]["tile_passes_per_image"] == 2 * (1 + 4)
