"""ServerApp: FedDST around the app's own MLP, evaluated on held-out digits each round."""

from logging import INFO

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from custom_app.task import accuracy, new_model, test_set
from feddst_flwr import FedDST

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    rounds = int(config["num-server-rounds"])
    strategy = FedDST(
        maskable=["fc1.weight", "fc2.weight"],
        sparsity=float(config["sparsity"]),
        alpha=float(config["alpha"]),
        delta_r=int(config["delta-r"]),
        r_end=rounds // 2,
        clients_per_round=int(config["clients-per-round"]),
    )
    x, y = test_set()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = new_model()
        model.load_state_dict(arrays.to_torch_state_dict())
        result = accuracy(model, x, y)
        weights = [model.fc1.weight, model.fc2.weight]
        density = sum(int(w.count_nonzero()) for w in weights) / sum(w.numel() for w in weights)
        log(INFO, "custom-app round %d: test accuracy %.4f, density %.4f", server_round, result, density)
        return MetricRecord({"accuracy": result, "density": density})

    strategy.start(
        grid=grid, initial_arrays=ArrayRecord(new_model().state_dict()), num_rounds=rounds, evaluate_fn=evaluate
    )
