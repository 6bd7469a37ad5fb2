"""Issue 15 figure: one held-out DRR pose (drr_0000 with its most similar training pose drr_0036 as
reference), sam2-memory / reg-memseg (memory segmenter CKPT) / registration on clavicles, a scapula and a
lung; green truth, red prediction. Usage: python scripts/memseg_example_figure.py CKPT OUT.png"""
import sys, matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
from rau.data.dataset import load_dataset
from rau.methods import create_method
ck=sys.argv[1]; out=sys.argv[2]
t=load_dataset("runs/drr_full/test"); r=load_dataset("runs/drr_full/train")
tgt=t.load(t.entries[0]); ref=r.load([e for e in r.entries if e.id=="drr_0036"][0])
S=["left_clavicle","right_clavicle","left_scapula","left_lung"]
ms={n:create_method(n, memseg=ck) for n in ("sam2-memory","reg-memseg")}
ms["registration"]=create_method("registration")
fig,ax=plt.subplots(len(S),4,figsize=(12,3*len(S)))
for i,s in enumerate(S):
    ax[i,0].imshow(ref.image,cmap="gray"); ax[i,0].contour(ref.masks[s],colors="y"); ax[i,0].set_title("ref "+s)
    for j,(n,m) in enumerate(ms.items()):
        res=m.predict(ref,tgt,[s]).structures[s]
        ax[i,j+1].imshow(tgt.image,cmap="gray"); ax[i,j+1].contour(tgt.masks[s],colors="g")
        if res.mask is not None and res.mask.any(): ax[i,j+1].contour(res.mask,colors="r")
        from rau.metrics import dice
        ax[i,j+1].set_title(f"{n} {dice(res.mask,tgt.masks[s]) if res.mask is not None else 0:.2f}")
for a in ax.flat: a.axis("off")
plt.tight_layout(); plt.savefig(out,dpi=60)
