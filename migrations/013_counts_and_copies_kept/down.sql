DROP TRIGGER user_clusters_profile_is_a_copy ON user_clusters;
DROP FUNCTION dployr_user_clusters_profile_is_a_copy();
DROP TRIGGER cluster_counts_kept_by_triggers ON cluster_counts;
DROP FUNCTION dployr_cluster_counts_kept();
