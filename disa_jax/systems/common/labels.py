"""Class conditions of a class-conditional system (FlowAR, xAR): `conditions` gives every image a
class id (`config.sampling.classes` cycled, or all classes in `order`), `condition_count` the
number of classes; both read the class count off the system's `model_config(config)`."""

from __future__ import annotations


def class_condition_hooks(model_config):
  """(conditions, condition_count) for a `System`, given the system's `model_config`."""

  def conditions(config, num_images: int, *, order: str = 'cycle'):
    """Class id of every image (`config.sampling.classes` cycled, or all classes)."""
    from disa_jax.engine.runner import class_labels
    from disa_jax.systems.mar.system import parse_classes

    return class_labels(num_images, parse_classes(config.sampling.classes),
                        model_config(config).class_num, order=order)

  def condition_count(config) -> int:
    return model_config(config).class_num

  return conditions, condition_count
