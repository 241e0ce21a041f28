import random, shutil, tempfile, sqlite3
from pathlib import Path
from tests.attack_t14.probe_flips import make_image, trial
root = Path(tempfile.mkdtemp(prefix="v14rep-")); image = root / "image"; image.mkdir()
truth = make_image(image, random.Random(1))
raw = (image / "b.db").read_bytes()
print("byte20470 =", raw[20470], "page4 byte 15832 =", raw[15832], raw[15820:15840])
c = sqlite3.connect(image / "b.db"); print(c.execute("select * from sqlite_sequence").fetchall()); c.close()
img = root / "img2"; shutil.copytree(image, img)
b = bytearray((img / "b.db").read_bytes()); b[20470] ^= 8; (img / "b.db").write_bytes(bytes(b))
pass
print(trial(img, root / "work", truth, "b.db", 15832, 1))
