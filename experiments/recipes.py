"""What the demo and the study train and evaluate, as data: the recipes, the map sources, the evaluations."""
from dataclasses import dataclass

# agmae-discover's options of each map source, one store per (source, dataset). The oracle area-averages the masks
# onto a 28x28 grid (224 px / patch 8), finer than the model's 8x8 patch grid, so that a random crop cuts it between
# cells. mae-tokencut-128, the own maps (no outside weights), is TokenCut on the tokens of the last block (blocks.3 of
# the depth-4 demo MAE, before the final LayerNorm) of the same seed's vanilla MAE, mean-centred, with the border rule
# (an MAE's most distinctive token is often background, which misleads TokenCut's seed rule), at 128 px: the closest
# to the masks of the settings measured (docs/results/light-b256-continue/RESULTS.md). tokencut and gradcam use the
# offline ImageNet EfficientNet-Lite0, the 64-px images up-sampled to 224 px; dino-random, the negative control, is
# the CLS attention of a randomly initialised ViT-S/8.
MAPS = {
    "oracle": ("--method", "oracle", "--patch", "8"),
    "mae-tokencut-128": ("--method", "tokencut", "--layer", "blocks.3", "--center", "--fg-rule", "border",
                         "--image-size", "128"),
    "tokencut": ("--method", "tokencut", "--backbone", "tf_efficientnet_lite0", "--image-size", "224"),
    "gradcam": ("--method", "gradcam", "--backbone", "tf_efficientnet_lite0", "--image-size", "224"),
    "dino-random": ("--method", "dino", "--backbone", "vit_small_patch8_224", "--random-init", "--seed", "0",
                    "--image-size", "64"),
}
# Map sources cut from the same seed's vanilla MAE (`--backbone RUN/checkpoint-last.pth`): they wait for it.
OWN_MAP_SOURCES = ("mae-tokencut-128",)
# Discovery in bf16 where the CPU computes it natively, where it is 2-3x faster.
DISCOVERY_PRECISION = ("--precision", "native")

# agmae-train's guidance defaults, passed explicitly so that every run's command says what it trained.
GUIDANCE_DEFAULTS = {"tau-schedule": "cosine", "tau-start": 1.0, "tau-end": 0.5, "weight-norm": "batch"}

# Evaluations: step name -> (agmae-eval arguments, results.json key). Every evaluation extracts in fp32: bf16
# features move a run's k-NN by more than the differences compared here.
EVALS = {
    "knn": (("knn",), "knn"),
    "knn-mean": (("knn", "--pool", "mean"), "knn[pool=mean]"),
    "linear": (("linear", "--mode", "cached"), "linear-cached"),
    "robustness": (("robustness",), "robustness"),
    # the demo's evaluation: mean-pooled features on every background split (clean-fg is the CLS diagnostic)
    "robustness-mean": (("robustness", "--pool", "mean", "--no-clean-fg"), "robustness[pool=mean]"),
    "finetune": (("finetune",), "finetune"),
    # the dense probe: a linear classifier on the frozen patch tokens, mIoU against the masks of the original test
    # split and of the one with unseen backgrounds
    "segment": (("segment", "--splits", "original", "--splits", "mixed-rand"), "segment"),
}
EVAL_PRECISION = ("--precision", "fp32")


@dataclass(frozen=True)
class Recipe:
    """What every compared MAE trains: `epochs` with `warmup_epochs` of warm-up (the share kept when the epochs
    change) at `batch_size`, the `model` preset with base lr `blr` in `precision`. Own maps (`own_maps`) are cut
    from the vanilla run, or, with `first_round_epochs`, from a vanilla MAE of that many epochs (a first round).
    With `continue_first_round`, every compared run starts from the first round's final weights (agmae-train
    --init-from) with a schedule of its own, so the first round is trained once, not three times. `headline`: the
    results field (experiments.results.RunResults) the demo's verdict judges."""
    name: str
    epochs: int
    warmup_epochs: float
    batch_size: int
    own_maps: str
    summary: str
    headline: str
    first_round_epochs: int | None = None
    continue_first_round: bool = False
    model: str = "mae_vit_demo_patch8"
    blr: float = 1e-3
    precision: str = "native"

    def __post_init__(self):
        if self.continue_first_round and self.first_round_epochs is None:
            raise ValueError("a recipe that continues its first round needs first_round_epochs")

    def warmup(self, epochs: int) -> float:
        return round(self.warmup_epochs * epochs / self.epochs, 4)

    def train_options(self, epochs: int) -> list[str]:
        """agmae-train's schedule and batch options for `epochs` epochs of this recipe."""
        return ["--epochs", str(epochs), "--warmup-epochs", f"{self.warmup(epochs):g}",
                "--batch-size", str(self.batch_size)]

    def first_round(self, epochs: int) -> int | None:
        """Epochs of the vanilla MAE whose tokens the own maps are cut from (and whose weights the compared runs
        continue, with `continue_first_round`) when the compared runs train `epochs`; None: the own maps are cut
        from the vanilla run itself."""
        if self.continue_first_round or self.first_round_epochs != epochs:
            return self.first_round_epochs
        return None

    def epochs_text(self, epochs: int) -> str:
        """How long each compared MAE trains, as the demo's table heading says it."""
        if self.continue_first_round:
            return f"{self.first_round_epochs} epochs of a shared vanilla first round, then {epochs} epochs each"
        return f"{epochs} epochs per MAE"

    def demo_rows(self) -> tuple[str, ...]:
        """The demo's rows: vanilla, oracle guidance and guidance by the recipe's own maps."""
        return ("vanilla", "guided-oracle", f"guided-{self.own_maps}")

    @property
    def page(self) -> str:
        """The results page of this recipe's study."""
        return f"docs/results/{self.name}/RESULTS.md"


RECIPES = {recipe.name: recipe for recipe in (
    # A 16-epoch vanilla MAE as one first round, which each compared run continues for 10 epochs (what a 20-minute
    # demo holds), own maps cut from it, judged on unseen backgrounds.
    Recipe("light-b256-continue", epochs=10, warmup_epochs=1.25, batch_size=256, own_maps="mae-tokencut-128",
           first_round_epochs=16, continue_first_round=True, headline="mixed_rand_knn_mean",
           summary="a 16-epoch vanilla MAE continued for 10 epochs by each compared run, own maps from that first "
                   "round"),
    # 32 epochs from scratch, own maps from a 16-epoch first round trained beside them: the maps of a 32-epoch
    # vanilla MAE are worse than a 16-epoch one's (docs/results/light-b256-e32/RESULTS.md).
    Recipe("light-b256-e32", epochs=32, warmup_epochs=4.0, batch_size=256, own_maps="mae-tokencut-128",
           first_round_epochs=16, headline="mixed_rand_knn_mean",
           summary="32 epochs per MAE, own maps from a 16-epoch vanilla first round, about twice as long"),
)}
DEFAULT_RECIPE = "light-b256-continue"
