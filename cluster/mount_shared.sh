#!/usr/bin/env bash
# Mount the cluster's shared file system (NFS, e.g. Amazon EFS) on a node; the cluster YAMLs
# run it on every node so shard folders are readable everywhere. Idempotent.
#
#   mount_shared.sh NFS_SOURCE MOUNT_POINT     e.g. fs-0123.efs.us-west-2.amazonaws.com:/ /efs
#   mount_shared.sh - MOUNT_POINT              already mounted by the OS: only check it is writable
set -euo pipefail

die() { echo "mount_shared.sh: $*" >&2; exit 2; }

[ $# -eq 2 ] || die "usage: mount_shared.sh NFS_SOURCE|- MOUNT_POINT"
source=$1
mount_point=$2

case "$source" in
  *REPLACE_*) die "shared storage '$source' is a placeholder: edit it in the cluster YAML" ;;
esac

if [ "$source" != "-" ] && ! mountpoint -q "$mount_point"; then
  if ! command -v mount.nfs4 >/dev/null; then
    sudo apt-get update -qq && sudo apt-get install -y -qq nfs-common
  fi
  sudo mkdir -p "$mount_point"
  # Options recommended for EFS; harmless for a plain NFS server.
  sudo mount -t nfs4 -o nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport \
    "$source" "$mount_point"
fi

mountpoint -q "$mount_point" || [ -d "$mount_point" ] || die "$mount_point does not exist on $(hostname)"
fstype=$(stat -f -c %T "$mount_point")
case "$fstype" in
  ext2/ext3 | ext4 | xfs | btrfs | zfs | tmpfs | overlayfs)
    echo "mount_shared.sh: warning: $mount_point on $(hostname) is a local $fstype file system; other nodes will not see its files" >&2 ;;
esac
# A folder this user owns, so Ray workers (running as this user) can write into it.
[ -w "$mount_point/segdist" ] || mkdir -p "$mount_point/segdist" 2>/dev/null \
  || sudo install -d -o "$(id -u)" -g "$(id -g)" "$mount_point/segdist"
echo "shared storage ready at $mount_point/segdist"
