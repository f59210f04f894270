"""Built-in model architectures, one module per family."""

__all__ = ["BUILTIN"]

BUILTIN: tuple[str, ...] = (
    "rankopt.plugins.models.small_cnn",
    "rankopt.plugins.models.lenet",
    "rankopt.plugins.models.resnet_cifar",
    "rankopt.plugins.models.vgg",
    "rankopt.plugins.models.torchvision_models",
)
