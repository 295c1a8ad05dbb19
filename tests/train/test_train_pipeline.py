"""The grain pipeline, traced through images whose pixel value is the example's id."""

import grain
import numpy as np
import pytest
from PIL import Image

from train.pipeline import eval_dataset, make_iterator, restore_iterator_state, save_iterator_state, train_dataset
from train.tasks import Example, Task

SIZE = 8
NO_SHARDING = grain.sharding.NoSharding()


@pytest.fixture
def tasks(make_task):
    # ids 0..5 belong to task 0 (classify), ids 10..13 to task 1 (lm)
    return [make_task("a", n_train=6, first_id=0), make_task("b", head="lm", n_train=4, first_id=10)]


def ids(batch) -> list[int]:
    return [int(image[0, 0, 0]) for image in batch["image"]]


def epoch_ids(dataset, batches_per_epoch, epoch):
    return [i for b in range(batches_per_epoch) for i in ids(dataset[epoch * batches_per_epoch + b])]


ALL_IDS = [0, 1, 2, 3, 4, 5, 10, 11, 12, 13]


def test_batch_elements_carry_image_prompt_answer_label_and_task(tasks):
    dataset = train_dataset(tasks, batch_size=5, seed=0, image_size=SIZE, num_epochs=1, sharding=NO_SHARDING)
    assert len(dataset) == 2
    for batch in (dataset[0], dataset[1]):
        assert batch["image"].shape == (5, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].dtype == np.int32 and batch["task"].dtype == np.int32
        for i, prompt, answer, label, task in zip(ids(batch), batch["prompt"], batch["answer"], batch["label"],
                                                  batch["task"]):
            if i < 10:  # task a: labels alternate no/yes
                assert (prompt, answer, label, task) == ("what is a ?", ("no", "yes")[i % 2], i % 2, 0)
            else:
                assert (prompt, answer, label, task) == ("what is b ?", f"answer {i - 10}", -1, 1)
    assert sorted(ids(dataset[0]) + ids(dataset[1])) == ALL_IDS


def test_each_epoch_is_a_new_permutation_and_the_seed_decides_it(tasks):
    def dataset(seed):
        return train_dataset(tasks, batch_size=5, seed=seed, image_size=SIZE, num_epochs=3, sharding=NO_SHARDING)

    epochs = [epoch_ids(dataset(0), 2, e) for e in range(3)]
    assert all(sorted(order) == ALL_IDS for order in epochs)
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != ALL_IDS
    assert epochs[0] == epoch_ids(dataset(0), 2, 0)
    assert epochs[0] != epoch_ids(dataset(1), 2, 0)


def test_drop_remainder_drops_the_short_batch(tasks):
    dataset = train_dataset(tasks, batch_size=4, seed=0, image_size=SIZE, num_epochs=1, sharding=NO_SHARDING)
    assert len(dataset) == 2  # 10 examples -> two batches of 4, the last 2 dropped


def test_hosts_read_their_rows_of_the_same_global_batches(tasks):
    """Whatever the number of hosts, host i's batch k is rows i*B/n .. (i+1)*B/n of the one-host batch k."""
    def dataset(index, count, num_epochs=3):
        return train_dataset(tasks, batch_size=6, seed=0, image_size=SIZE, num_epochs=num_epochs,
                             sharding=grain.sharding.ShardOptions(index, count))

    single = dataset(0, 1)
    assert len(single) == 5  # 30 examples in 3 epochs -> 5 batches of 6
    for count in (2, 3):
        hosts = [dataset(index, count) for index in range(count)]
        assert [len(h) for h in hosts] == [5] * count
        for k in range(5):
            assert [i for h in hosts for i in ids(h[k])] == ids(single[k])
    one_epoch = [dataset(index, 2, num_epochs=1) for index in range(2)]
    assert [len(h) for h in one_epoch] == [1, 1]  # 10 examples: one whole batch of 6 for both hosts
    with pytest.raises(ValueError, match="batch size 6 is not a multiple of the 4 hosts"):
        dataset(0, 4)


def test_default_sharding_is_this_jax_process(tasks):
    single = train_dataset(tasks, batch_size=10, seed=0, image_size=SIZE, num_epochs=1)
    assert sorted(ids(single[0])) == ALL_IDS  # one process: the whole union


def test_restored_iterator_sees_the_same_batches(tasks, tmp_path):
    def fresh():
        return make_iterator(train_dataset(tasks, batch_size=3, seed=4, image_size=SIZE, sharding=NO_SHARDING))

    iterator = fresh()
    for _ in range(5):
        next(iterator)
    save_iterator_state(iterator, tmp_path / "data_state.json")
    expected = [ids(next(iterator)) for _ in range(6)]

    resumed = fresh()
    restore_iterator_state(resumed, tmp_path / "data_state.json")
    assert [ids(next(resumed)) for _ in range(6)] == expected
    assert [ids(next(fresh())) for _ in range(1)] != expected[:1]


def test_eval_dataset_keeps_order_and_the_short_last_batch(tasks):
    dataset = eval_dataset(tasks[1], 1, batch_size=3, image_size=SIZE)
    val = tasks[1].val  # ids 14, 15
    assert len(dataset) == 1 and ids(dataset[0]) == [14, 15]
    assert dataset[0]["answer"] == [e.answer for e in val] and list(dataset[0]["task"]) == [1, 1]


def test_file_images_are_decoded_to_the_image_size_and_row_prompts_win(tmp_path):
    Image.new("RGB", (30, 20), (0, 200, 0)).save(tmp_path / "g.png")
    row = Example(tmp_path / "g.png", "green", -1, prompt="which colour ?")
    task = Task("files", "lm", "accuracy", 0.5, "task prompt", [row], [row])
    batch = train_dataset([task], batch_size=1, seed=0, image_size=SIZE, num_epochs=1, sharding=NO_SHARDING)[0]
    assert batch["image"].shape == (1, SIZE, SIZE, 3) and (batch["image"] == (0, 200, 0)).all()
    assert batch["prompt"] == ["which colour ?"]


def test_orbax_saves_and_restores_the_iterator_through_grain_checkpoint(tasks, tmp_path):
    """The route for saving the data position inside the trainer's Orbax checkpoint."""
    import orbax.checkpoint as ocp

    def fresh():
        return make_iterator(train_dataset(tasks, batch_size=2, seed=1, image_size=SIZE, sharding=NO_SHARDING))

    iterator = fresh()
    for _ in range(3):
        next(iterator)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
        expected = [ids(next(iterator)) for _ in range(4)]
        resumed = fresh()
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    assert [ids(next(resumed)) for _ in range(4)] == expected
