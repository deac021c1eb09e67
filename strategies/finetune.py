"""FedAvg+FT: each client fine-tunes the trained model on its own train split before predicting.

The standard personalization baseline (e.g. Wang et al., "Federated Evaluation
of On-device Personalization", 2019; Yu et al., "Salvaging Federated Learning
by Local Adaptation", 2020). Training is FedAvg's; the fine-tuning happens at
evaluation, so it also applies to clients held out of training and, as a
personalizer (``eval.personalizers``), to any strategy's backbone. Settings
live in ``[finetune]``.
"""

from __future__ import annotations

import copy

from fedmem.models import Backbone
from fedmem.strategy import ClientContext, ModelPredictor, Predictor, Strategy
from fedmem.training import SGDSettings, train


class FineTune(Strategy):
    """FedAvg training; personalize = ``finetune.epochs`` epochs of local SGD on a copy of the model."""

    name = "finetune"
    title = "FedAvg+FT"
    predictor_title = "fine-tuned"
    on_any_model = True
    summary = "FedAvg+FT: FedAvg training, then each client fine-tunes the model on its own train split"
    label = "finetune"

    adapts = True

    def personalize(self, model: Backbone, ctx: ClientContext) -> Predictor:
        return self._tuned(model, ctx, epochs=self.cfg.finetune.epochs)

    def adapted(self, model: Backbone, ctx: ClientContext, steps: int) -> Predictor:
        if steps == 0:  # the model as is (SGDSettings(steps=0) would mean epochs)
            return ModelPredictor(model, self.cfg.eval.batch_size)
        return self._tuned(model, ctx, steps=steps)

    def _tuned(self, model: Backbone, ctx: ClientContext, *, epochs: int = 1, steps: int = 0) -> Predictor:
        f = self.cfg.finetune
        tuned = copy.deepcopy(model)
        settings = SGDSettings(
            lr=f.lr, momentum=f.momentum, epochs=epochs, steps=steps, batch_size=f.batch_size
        )
        stats = train(
            tuned, ctx.data.x_train, ctx.data.y_train, settings, ctx.rng("finetune"), loss_fn=ctx.loss()
        )
        return ModelPredictor(tuned, self.cfg.eval.batch_size, {"loss": stats.loss})
