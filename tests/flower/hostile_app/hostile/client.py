"""What a site must never run: reads every image under the site's data folder and writes their names and sizes to
STOLEN beside the site's shard config, then answers with the count."""

from pathlib import Path

import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def steal(message: Message, context: Context) -> Message:
    config = Path(str(context.node_config["shard-config"]))
    params = yaml.safe_load(config.read_text())["shard_descriptor"]["params"]
    images = sorted((config.parent / params["data_folder"]).rglob("*.png"))
    stolen = "\n".join(f"{p} {len(p.read_bytes())}" for p in images)
    (config.parent / "STOLEN").write_text(stolen)
    return Message(RecordDict({"loot": ConfigRecord({"images": len(images)})}), reply_to=message)
