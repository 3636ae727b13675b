import torch
from conftest import tiny_context

from mka_edge.analysis import analyze
from mka_edge.mka.diffusion import diffusion_map
from mka_edge.mka.similarity import kmeans, kmeans_batched, nmi_matrix


def test_nmi_is_one_on_the_diagonal_symmetric_and_label_name_free():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 6, (2000,), generator=g)
    renamed = (a + 3) % 6
    indep = torch.randint(0, 6, (2000,), generator=g)
    s = nmi_matrix(torch.stack([a, renamed, indep]), 6)
    assert torch.allclose(s, s.T)
    assert torch.allclose(s.diagonal(), torch.ones(3, dtype=s.dtype))
    assert s[0, 1] > 0.999  # same partition under other label names
    assert s[0, 2] < 0.02  # independent labels


def test_diffusion_map_separates_two_clusters_and_kmeans_finds_them():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(100, 16, generator=g), torch.randn(100, 16, generator=g) + 8])
    emb = diffusion_map(x, dims=4)
    assert emb.shape == (200, 4)
    first = emb[:, 0]
    assert (first[:100] > 0).all() != (first[100:] > 0).all() or (first[:100].mean() * first[100:].mean() < 0)
    labels = kmeans(emb, 2, seed=0)
    truth = torch.cat([torch.zeros(100), torch.ones(100)]).long()
    assert nmi_matrix(torch.stack([labels, truth]), 2)[0, 1] > 0.99


def test_analysis_is_deterministic_and_well_formed(tiny_dir, tmp_path):
    r1 = analyze(tiny_context(tiny_dir), tmp_path / "a")
    r2 = analyze(tiny_context(tiny_dir), tmp_path / "b")
    assert r1["similarity"] == r2["similarity"]
    s = torch.tensor(r1["similarity"])
    L = r1["num_layers"]
    assert s.shape == (L, L) and torch.allclose(s, s.T) and torch.allclose(s.diagonal(), torch.ones(L))
    assert (tmp_path / "a" / "similarity.json").is_file() and (tmp_path / "a" / "similarity.png").stat().st_size > 1000
    r3 = analyze(tiny_context(tiny_dir, seed=5), tmp_path / "c")
    assert r3["similarity"] != r1["similarity"]  # the seed is really used


def _blobs(seed: int, k: int = 4, per: int = 50, dims: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` tight, far-apart Gaussian blobs in random order, and their true labels."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, dims, generator=g) * 20
    truth = torch.arange(k).repeat_interleave(per)
    x = means[truth] + 0.1 * torch.randn(k * per, dims, generator=g)
    order = torch.randperm(k * per, generator=g)
    return x[order].double(), truth[order]


def test_kmeans_batched_recovers_separated_blobs():
    blobs = [_blobs(s) for s in range(5)]
    x = torch.stack([b[0] for b in blobs])
    labels = kmeans_batched(x, 4, seeds=list(range(5)))
    assert labels.shape == (5, 200)
    for lab, (_, truth) in zip(labels, blobs, strict=True):
        assert nmi_matrix(torch.stack([lab, truth]), 4)[0, 1] > 1 - 1e-9


def test_kmeans_batched_is_deterministic_and_uses_its_seeds():
    x = torch.randn(3, 120, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a = kmeans_batched(x, 6, seeds=[7, 8, 9])
    assert torch.equal(a, kmeans_batched(x, 6, seeds=torch.tensor([7, 8, 9])))
    # unstructured data: other seeds start elsewhere and end in other partitions somewhere
    assert not torch.equal(a, kmeans_batched(x, 6, seeds=[70, 80, 90]))


def test_kmeans_batched_gives_each_problem_its_labels_alone():
    x = torch.randn(6, 150, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    seeds = [11, 12, 13, 14, 15, 16]
    together = kmeans_batched(x, 5, seeds)
    for b in range(6):
        assert torch.equal(together[b], kmeans_batched(x[b : b + 1], 5, seeds[b : b + 1])[0])
        assert torch.equal(together[b], kmeans(x[b], 5, seeds[b]))
    assert torch.equal(together[2:4], kmeans_batched(x[2:4], 5, seeds[2:4]))


def test_kmeans_batched_stops_early_once_every_restart_converged():
    x = torch.stack([_blobs(s)[0] for s in range(3)])
    easy: dict = {}
    kmeans_batched(x, 4, seeds=[0, 1, 2], iters=50, check_every=5, info=easy)
    assert easy["iterations"] in (5, 10)  # converged in a few steps, seen at the next check
    every: dict = {}
    kmeans_batched(x, 4, seeds=[0, 1, 2], iters=50, check_every=1, info=every)
    assert every["iterations"] <= easy["iterations"] and every["iterations"] < 50
    hard: dict = {}
    noise = torch.randn(2, 400, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    kmeans_batched(noise, 8, seeds=[0, 1], iters=3, check_every=5, info=hard)
    assert hard["iterations"] == 3  # capped by iters


def test_kmeans_batched_handles_fewer_points_than_clusters_and_duplicates():
    same = torch.ones(2, 5, 2, dtype=torch.float64)  # every distance 0: uniform seeding, one cluster
    labels = kmeans_batched(same, 8, seeds=[0, 1])
    assert labels.shape == (2, 5) and (labels == labels[:, :1]).all()
