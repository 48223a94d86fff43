"""What the sharded hardness and discovery tests share: a GCE-biased classifier trained once per module and saved
(what every shard loads), and a dataset with unlabelled and generated samples that must get no value."""

import fiftyone as fo
import pytest

from fairbalance.train import training

FAST = dict(backbone="mlp", image_size=16, epochs=3, batch_size=64, seed=0)


@pytest.fixture(scope="module")
def biased_folder(digits_dataset, tmp_path_factory):
    """A GCE-biased classifier trained once on the train split and saved: what every shard loads."""
    clf = training.train_classifier(digits_dataset.match_tags("train"), training.TrainConfig(method="biased", **FAST))
    return clf.save(str(tmp_path_factory.mktemp("biased") / "clf"))


def with_generated_and_unlabelled(ds):
    """3 samples lose their label, 4 generated copies join: neither kind gets a value."""
    # Copy the labelled samples before unlabelling: ``take`` draws by a per-sample random field, so the
    # three it picks may include the four copied (that overlap made a test fail on CI).
    paths, labels = ds.match_tags("train").limit(4).values(["filepath", "ground_truth.label"])
    ds.take(3, seed=1).set_field("ground_truth", None).save()
    ds.add_samples([fo.Sample(filepath=p, ground_truth=fo.Classification(label=lab), generated=True)
                    for p, lab in zip(paths, labels)])
    return ds


def by_id(ds, field):
    return dict(zip(*ds.values(["id", field])))
