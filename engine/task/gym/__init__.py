"""reasoning-gym as data and verifier (the ``real`` extra): seeded, disjoint problem sets of named
datasets (:mod:`~engine.task.gym.problems`), the ``reasoning_gym`` verifier that asks each
dataset's own scorer (:mod:`~engine.task.gym.answers`), and ``data=reasoning_gym``: a model's
start accuracy and on-policy pairs on those problems, cached (:mod:`~engine.task.gym.pipeline`).

Importing the package registers the verifier and the data source (:mod:`engine.task.gym.register`)
without importing reasoning-gym itself.
"""

from engine.task.gym import register as _register  # noqa: F401  (the verifier and data source)
