import torch
from conftest import tiny_context

from mka_edge.analysis import analyze
from mka_edge.mka.diffusion import diffusion_map
from mka_edge.mka.similarity import kmeans, nmi_matrix


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
