"""A toy non-streaming quality metric for the `disa-eval --metric=module:Class` tests."""

import numpy as np


class MeanBrightness:
  name = 'brightness'
  primary = 'brightness'
  higher_is_better = True

  def evaluate(self, images, labels):
    images, labels = np.asarray(images, np.float64), np.asarray(labels)
    return {'brightness': float(images.mean()),
            'first_image_sum': float(images[0].sum()),
            'label_0_brightness': float(images[labels == 0].mean()),
            'num_images': int(len(images))}
