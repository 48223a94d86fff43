"""Discovered slices as the generator's attribute: discovery -> class x slice diffusion -> cells (issue #26)."""

import pytest

import fairbalance as fb
from fairbalance.generate.diffusion import load_conditional_diffusion, train_conditional_diffusion
from fairbalance.generate.generation import generate_balanced

TINY = dict(image_size=16, block_out_channels=(16, 32), batch_size=32)


@pytest.fixture
def three_digits():
    from fairbalance.datasets import colored_digits as datasets

    ds = datasets.colored_digits("fb-disc-road", num_classes=3, train_per_class=20, test_per_class=2,
                                 persistent=False, overwrite=True)
    yield ds
    ds.delete()


@pytest.mark.timeout(300)
def test_discovered_slices_are_the_cells_attribute(three_digits, one_thread, tmp_path):
    """The slice field (a plain string field) conditions the generator and the generated samples carry it
    as a string, so the slice filter and the next run read real and generated samples alike."""
    ds, train = three_digits, three_digits.match_tags("train")
    res = fb.discover_slices(train, "ground_truth", method="george", epochs=1, slices_per_class=2,
                             output_dir=str(tmp_path / "gce"))
    model = train_conditional_diffusion(train, "ground_truth", attribute_field="slice", epochs=1,
                                        output_dir=str(tmp_path / "model"), **TINY)
    diff = load_conditional_diffusion(model)
    assert sorted(diff.attributes) == sorted(r["slice"] for r in res.slices) and len(diff.attributes) == 6
    real = {}
    for gt, sl in zip(*train.values(["ground_truth.label", "slice"])):
        real[(gt, sl)] = real.get((gt, sl), 0) + 1
    gen = generate_balanced(train, "ground_truth", model=model, mode="cells", per_cell=2, source="edit",
                            num_inference_steps=2, output_dir=str(tmp_path / "gen"), realism_sample=0)
    # every class x slice cell, the other classes' slices too (a digit in another class's look)
    expected = {f"{c}|{a}": max(0, 2 - real.get((c, a), 0)) for c in diff.classes for a in diff.attributes}
    assert gen.added == expected and sum(expected.values()) > 0
    new = ds.match_tags("generated")
    assert len(new) == gen.num_added
    assert ds.get_field("slice").__class__.__name__ == "StringField"  # the schema discovery wrote, kept
    for (gt, sl, cell) in zip(*new.values(["ground_truth.label", "slice", "generation.cell"])):
        assert f"{gt}|{sl}" == cell
    some = res.slices[0]  # the slice filter (the panel's pick) finds its real and generated members
    assert len(ds.match({"slice": some["slice"]})) == some["size"] + sum(
        n for k, n in expected.items() if k.endswith(f"|{some['slice']}"))
    # a rerun adds nothing
    again = generate_balanced(train, "ground_truth", model=model, mode="cells", per_cell=2, source="edit",
                              num_inference_steps=2, output_dir=str(tmp_path / "gen"), realism_sample=0)
    assert again.num_added == 0 and len(ds.match_tags("generated")) == len(new)
