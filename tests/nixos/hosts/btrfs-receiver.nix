# A btrfs backup host: receiving needs root there; copies land below a directory whose name has a
# space (the forced command must quote it); senders may add and read back, never delete.
{
  boot.supportedFilesystems = [ "btrfs" ];
  services.snapsync.receive = {
    enable = true;
    backend = "btrfs";
    user = "root";
    root = "/srv/back ups";
    appendOnly = true;
    allowRestore = true;
    authorizedKeys = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN3VcEebbuXt7foJnVp0T6Dh0P2PwiZzlDgJ58oxKALQ root@forge" ];
  };
}
