"""build_sem_seg_evaluator: figures on a synthetic prediction equal hand-computed IoU / mIoU / pixel accuracy,
with ground truth read through label_id_map (Cityscapes labelIds)."""
import os
import tempfile
import unittest

import numpy as np
import torch

import semiseg_d2  # noqa: F401
from semiseg_d2.data.datasets import unregister
from semiseg_d2.data.datasets.register_cityscapes import register_all_cityscapes
from semiseg_d2.evaluation import build_sem_seg_evaluator

from tests import synthetic_trees as st
from tests.tiny import tiny_cfg


class TestSemSegEvaluator(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        tree = st.make_cityscapes_tree(self._tmp.name, train_ids=False)
        frame = tree["frames"]["val"][0]
        gt_dir = os.path.join(tree["city_root"], "gtFine", "val", "frankfurt")
        self.image = os.path.join(tree["city_root"], "leftImg8bit", "val", "frankfurt", f"{frame}_leftImg8bit.png")
        st.write_image(self.image, 0, 2, 4)
        # raw labelIds: 7 road -> 0, 8 sidewalk -> 1, 11 building -> 2, 0 unlabeled -> 255
        st.write_label(os.path.join(gt_dir, f"{frame}_gtFine_labelIds.png"), np.array([[7, 7, 8, 0], [11, 11, 8, 8]]))
        self.names = register_all_cityscapes(self._tmp.name, splits_dir=tree["splits_dir"], prefix="ev_")

    def tearDown(self):
        unregister(self.names)
        self._tmp.cleanup()

    def test_figures_match_hand_computation(self):
        cfg = tiny_cfg(num_classes=19)
        evaluator = build_sem_seg_evaluator(cfg, "ev_cityscapes_fine_val", output_dir=None, distributed=False)
        pred = torch.tensor([[0, 1, 1, 5], [2, 0, 1, 2]])  # class 5 lands on the ignored pixel only
        probs = torch.nn.functional.one_hot(pred, 19).permute(2, 0, 1).float()
        evaluator.reset()
        evaluator.process([{"file_name": self.image, "height": 2, "width": 4}], [{"sem_seg": probs}])
        res = evaluator.evaluate()["sem_seg"]
        # GT (train ids) [[0,0,1,255],[2,2,1,1]]; 7 valid pixels.
        # class 0: GT {(0,0),(0,1)}, pred {(0,0),(1,1)}: TP 1, union 3 -> 1/3
        # class 1: GT {(0,2),(1,2),(1,3)}, pred {(0,1),(0,2),(1,2)}: TP 2, union 4 -> 1/2
        # class 2: GT {(1,0),(1,1)}, pred {(1,0),(1,3)}: TP 1, union 3 -> 1/3
        # classes without GT are left out of the mean; pixel accuracy = 4 correct / 7 valid
        self.assertAlmostEqual(res["IoU-road"], 100 / 3)
        self.assertAlmostEqual(res["IoU-sidewalk"], 50.0)
        self.assertAlmostEqual(res["IoU-building"], 100 / 3)
        self.assertAlmostEqual(res["mIoU"], 100 * (1 / 3 + 1 / 2 + 1 / 3) / 3)
        self.assertAlmostEqual(res["pACC"], 100 * 4 / 7)
        self.assertTrue(np.isnan(res["IoU-pole"]))

    def test_rejects_other_evaluator_types_and_class_mismatch(self):
        with self.assertRaisesRegex(ValueError, "evaluator_type"):
            build_sem_seg_evaluator(tiny_cfg(num_classes=19), "cityscapes_fine_sem_seg_val", None)
        with self.assertRaisesRegex(ValueError, "NUM_CLASSES"):
            build_sem_seg_evaluator(tiny_cfg(num_classes=11), "ev_cityscapes_fine_val", None)


if __name__ == "__main__":
    unittest.main()
