"""Stage `classifier`: a LeNet-style CNN trained on the MNIST training split. Its 128-d penultimate layer
is the feature space of every sample-quality score (`*_mnist_cnn`), and its class probabilities feed the
IS-style score and the class distribution."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import StudyConfig
from pipeline.data import images_to_tensor, load_prepared
from pipeline.engine import resolve_device, set_threads, train_epoch
from pipeline.errors import ArtifactError
from pipeline.evaluation.features import embed
from pipeline.models.contract import descend
from pipeline.outputs import load_torch_file, restore_weights, save_torch_file, staged_dir, write_json
from pipeline.paths import CLASSIFIER_DIR, CLASSIFIER_FILE, PREPARED_FILE, TEST_FEATURES_FILE
from pipeline.stage_params import CLASSIFIER_PARAMS, check_unchanged

log = logging.getLogger(__name__)


class DigitClassifier(nn.Module):
    num_features = 128  # read by torchmetrics for a custom feature extractor

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, self.num_features),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def accuracy(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    _, probabilities = embed(classifier, images)
    return (probabilities.argmax(1) == labels).float().mean().item()


def train_classifier(config: StudyConfig) -> dict:
    settings = config.classifier
    device = resolve_device(settings.device)
    set_threads(config.threads)
    arrays = load_prepared(PREPARED_FILE)
    images = images_to_tensor(arrays["train_images"], device)
    labels = torch.from_numpy(arrays["train_labels"]).long().to(device)
    torch.manual_seed(settings.seed)
    classifier = DigitClassifier().to(device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=settings.lr)
    shuffle = torch.Generator().manual_seed(settings.seed)
    steps = settings.epochs * -(-len(images) // settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=steps)

    def step(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        loss = F.cross_entropy(classifier(images[batch]), labels[batch], reduction="none")
        descend(optimizer, loss.mean())
        schedule.step()
        return {"loss": loss}

    for epoch in range(1, settings.epochs + 1):
        classifier.train()
        train_epoch(step, len(images), settings.batch_size, shuffle, device)
        val_accuracy = accuracy(
            classifier,
            images_to_tensor(arrays["val_images"], device),
            torch.from_numpy(arrays["val_labels"]).to(device),
        )
        log.info("classifier epoch %d/%d: validation accuracy %.4f", epoch, settings.epochs, val_accuracy)
    test_images = images_to_tensor(arrays["test_images"], device)
    metrics = {
        "val_accuracy": val_accuracy,
        "test_accuracy": accuracy(classifier, test_images, torch.from_numpy(arrays["test_labels"]).to(device)),
    }
    test_features, _ = embed(classifier, test_images)
    with staged_dir(CLASSIFIER_DIR) as out:
        save_torch_file(classifier.state_dict(), out / CLASSIFIER_FILE.name)
        save_torch_file(test_features.cpu(), out / TEST_FEATURES_FILE.name)
        write_json(out / "metrics.json", metrics)
        check_unchanged(config, CLASSIFIER_PARAMS, "classifier")
    log.info("classifier: test accuracy %.4f", metrics["test_accuracy"])
    return metrics


def load_classifier(device: torch.device) -> DigitClassifier:
    path = CLASSIFIER_FILE
    classifier = DigitClassifier().to(device)
    restore_weights(classifier, load_torch_file(path, "classifier", device), path, "classifier")
    return classifier.eval()


def load_test_features(device: torch.device) -> torch.Tensor:
    path = TEST_FEATURES_FILE
    features = load_torch_file(path, "classifier", device)
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        raise ArtifactError(f"{path} does not hold a feature matrix; re-create it with `dvc repro -f classifier`")
    return features
