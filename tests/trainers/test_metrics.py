import numpy as np
import pytest

from trainers.metrics import class_embeddings, correct_ranks, retrieval_recall, zeroshot_accuracy


def unit(*rows):
    a = np.array(rows, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_templates_are_averaged_then_renormalised():
    per_template = np.array([[[1, 0], [0, 1]], [[1, 0], [1, 0]]], dtype=float)
    out = class_embeddings(per_template)
    assert out[0] == pytest.approx([np.sqrt(0.5), np.sqrt(0.5)])
    assert out[1] == pytest.approx([1, 0])


def test_zeroshot_top1_and_top5_by_hand():
    classes = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    images = unit([0.9, 0.1, 0], [0.1, 0.9, 0.3], [0.8, 0, 0.6], [0, 0.2, 1])
    labels = np.array([0, 1, 2, 1])
    acc = zeroshot_accuracy(images, classes, labels, ks=(1, 2))
    # predictions 0, 1, 0, 2 → correct: first two; top-2 adds image 2 (0.8 vs 0.6) and image 3 (1 vs 0.2)
    assert acc[1] == pytest.approx(0.5)
    assert acc[2] == pytest.approx(1.0)


def test_retrieval_ranks_are_one_based_and_ties_count_in_favour():
    scores = np.array([[0.9, 0.1, 0.2], [0.5, 0.4, 0.6], [0.3, 0.3, 0.3]])
    assert correct_ranks(scores).tolist() == [1, 3, 1]


def test_retrieval_recall_in_both_directions():
    images = unit([1, 0], [0, 1], [1, 1])
    texts = unit([1, 0], [1, 0.1], [0, 1])
    out = retrieval_recall(images, texts, ks=(1, 2))
    # i2t: image0 → text0 rank 1; image1 → text1 (0.1/1.005) below text2 (1): rank 2;
    #      image2 → text2 (0.707) vs text1 (0.774) and text0 (0.707 tie): rank 2
    assert out["i2t_r1"] == pytest.approx(1 / 3) and out["i2t_r2"] == pytest.approx(1.0)
    # t2i: text0 → image0 (1) rank 1; text1 → image1 (0.0995) below image0 and image2: rank 3;
    #      text2 → image2 (0.707) below image1 (1): rank 2
    assert out["t2i_r1"] == pytest.approx(1 / 3) and out["t2i_r2"] == pytest.approx(2 / 3)
