set -e
cd /tmp/legacy
export PYTHONPATH=/tmp/legacy DGLBACKEND=pytorch OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
W=/tmp/legacy_work; rm -rf $W; mkdir -p $W
M="$PY -m pipeline.cli"
$M preprocess datasets/qm9/xyz --out $W/qm9 --workers 0 --set preprocess.shard_size=128
$M preprocess datasets/mp/cifs.tar.gz --out $W/mp --workers 0 --set preprocess.shard_size=128
S="--set model.mpnn.hidden=8 --set model.mpnn.steps=1 --set model.mpnn.set2set_iters=1 --set model.schnet.hidden=8 --set model.schnet.interactions=1 --set model.schnet.n_rbf=8 --set finetune.head_hidden=8 --set train.epochs=1 --set train.batch_size=64 --set train.threads=1"
$M finetune --data $W/qm9 --out $W/run_qm9_mpnn $S --set 'finetune.targets=[gap_Ha,U0_Ha]'
$M finetune --data $W/mp --out $W/run_mp_schnet $S --set model.encoder=schnet --set model.schnet.cutoff=5.0 --set 'finetune.targets=[band_gap_eV,K_VRH_GPa]'
$M finetune --data $W/qm9 --out $W/run_qm9_both $S --set model.encoder=both --set 'finetune.targets=[homo_Ha]'
$M pretrain --data $W/qm9 --out $W/enc_qm9 $S --set pretrain.proj_hidden=8 --set pretrain.proj_dim=8
$M predict $W/run_qm9_mpnn datasets/qm9/xyz --out $W/pred_qm9_mpnn.csv
$M predict $W/run_mp_schnet datasets/mp/cifs.tar.gz --out $W/pred_mp_schnet.csv
$M predict $W/run_qm9_both datasets/qm9/xyz --out $W/pred_qm9_both.csv
$M embed $W/enc_qm9 datasets/qm9/xyz --out $W/emb_qm9_2d.csv
$M embed $W/enc_qm9 datasets/qm9/xyz --out $W/emb_qm9_3d.csv --which 3d
