"""ClientApp: the app's own model and train function behind feddst-flwr's `train_reply`."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from custom_app.task import new_model, own_train, partition
from feddst_flwr import train_reply

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    x, y = partition(int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]))
    train_fn = own_train(x, y, int(context.run_config["local-steps"]), float(context.run_config["lr"]))
    return train_reply(msg, context.state, new_model(), train_fn)
